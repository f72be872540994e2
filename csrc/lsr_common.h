// What the host side (.cpp: schema, checks, dispatch) and the device side (.cu: kernels) share:
// the element-type tag and one parameter struct per launch. No torch and no device code here.
//
// Conventions for every struct below: pointers are device pointers to contiguous row-major
// tensors; `acc` is the accumulation type (float for fp32/fp16/bf16 inputs, double for fp64);
// scale and grad are one-element acc tensors read inside the kernels (no host synchronisation).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace lsr {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// ----------------------------------------------------------------------------------- info_nce
struct InfoNceFwdParams {
  DType dtype;
  const void* a;        // [n, d]
  const void* b;        // [m, d] (m == n when fused_columns)
  const void* scale;    // [1] acc
  int n, m, d;
  int pos_off;          // the positive of row i is column i + pos_off (0 <= pos_off <= m - n)
  bool vec;             // 16-byte cp.async loads are legal (fp16/bf16, d % 8 == 0, aligned)
  bool fused_columns;   // also reduce the column statistics in the same pass (not for fp64)
  void* lse_row;        // [n] acc: logsumexp_j X[i, j]
  void* row_term;       // [n] acc: lse_row[i] - X[i, i + pos_off]
  void* diag;           // [n] acc: S[i, i] = <a_i, b_i> (written when fused_columns)
  unsigned long long* col_stats;  // [n] packed fp32 (running max, running sum) per column
};

struct InfoNceColFinalizeParams {
  const unsigned long long* col_stats;  // [n]
  const float* diag;                    // [n]
  const float* scale;                   // [1]
  int n;
  float* lse_col;                       // [n] out
  float* col_term;                      // [n] out: lse_col[j] - X[j, j]
};

// dA for the rows of A against all rows of B, X = s A B^T:
//   H[r, c] = use_row * exp(X[r, c] - lse_a[r]) + use_col * exp(X[r, c] - lse_b[c])
//             - (use_row + use_col) [c == r + pos_off]
//   grad_a = g * inv_norm * s * H B,   ds_partial[block] = sum over the block's tiles of H * S.
struct InfoNceBwdParams {
  DType dtype;
  const void* a;        // [n, d]
  const void* b;        // [m, d]
  const void* lse_a;    // [n] acc (read when use_row)
  const void* lse_b;    // [m] acc (read when use_col)
  const void* scale;    // [1] acc
  const void* grad;     // [1] acc: upstream gradient of the loss
  int n, m, d;
  int pos_off;          // the positive of row r is column r + pos_off (none when outside [0, m))
  bool vec;
  bool use_row, use_col;
  double inv_norm;      // 1 / (number of CE terms * n)
  void* grad_a;         // [n, d] in the input dtype
  void* ds_partial;     // [ceil(n / BM)] acc, or nullptr
};

// One-way CE(X) with the gradient of the left operand in the same pass (FlashAttention's forward
// with V = b): per row, lse_row, row_term as InfoNceFwdParams, and
//   grad_unit[r] = sum_(c != r + pos_off) P[r, c] b_c   (the host subtracts (1 - P_pos) b_(r + pos_off),
//                  then dL/da_r = g s / n * grad_unit[r]),
//   ds_row[r]    = sum_c P[r, c] S[r, c] - S[r, r + pos_off]   (dL/ds = g / n * sum_r ds_row[r]).
struct InfoNceFwdGradParams {
  DType dtype;
  const void* a;        // [n, d]
  const void* b;        // [m, d], m >= n
  const void* scale;    // [1] acc
  int n, m, d;
  int pos_off;          // the positive of row i is column i + pos_off (0 <= pos_off <= m - n)
  bool vec;
  void* lse_row;        // [n] acc
  void* row_term;       // [n] acc: lse_row[i] - X[i, i + pos_off]
  void* grad_unit;      // [n, d] in the accumulation dtype (rounded to the input dtype once, after scaling)
  void* ds_row;         // [n] acc
};

// ----------------------------------------------------------------------------------- exp_gram
struct RowNormsParams {
  DType dtype;
  const void* x;  // [n, d]
  int n, d;
  void* norms;    // [n] acc: |x_i|^2
};

struct ExpGramFwdParams {
  DType dtype;
  const void* x;        // [n, d]
  const void* norms;    // [n] acc
  double t;
  int n, d;
  bool vec;
  int grid;             // persistent blocks over the upper-triangle tiles
  void* partials;       // [grid] acc
};

struct ExpGramBwdParams {
  DType dtype;
  const void* x;        // [n, d]
  const void* norms;    // [n] acc
  const void* grad;     // [1] acc
  double t;
  int n, d;
  bool vec;
  void* grad_x;         // [n, d] in the input dtype
};

// ---------------------------------------------------------------------------------------- itc
struct ItcFwdParams {
  DType dtype;
  const void* q;        // [n, d]
  const void* q_m;      // [n, d]
  const void* bank;     // [m, d], m >= n; row i of bank is the positive of row i of q
  const void* scale;    // [1] acc
  double alpha;
  int n, m, d;
  bool vec;
  void* lse;            // [n] acc: logsumexp_j X[i, j],  X = s q bank^T
  void* lse_m;          // [n] acc: logsumexp_j Xm[i, j], Xm = s q_m bank^T
  void* row_term;       // [n] acc: lse[i] - alpha sum_j softmax(Xm)[i, j] X[i, j] - (1 - alpha) X[i, i]
};

struct ItcBwdParams {
  DType dtype;
  const void* q;
  const void* q_m;
  const void* bank;
  const void* lse;      // [n] acc
  const void* lse_m;    // [n] acc
  const void* scale;    // [1] acc
  const void* grad;     // [1] acc
  double alpha;
  int n, m, d;
  bool vec;
  void* grad_q;         // [n, d] in the input dtype
  void* ds_partial;     // [ceil(n / BM)] acc
};

// ------------------------------------------------------------------ launchers (defined in .cu)
// Each returns cudaSuccess or the launch error; `max_smem` is the device's opt-in shared memory
// per block, checked before launching (cudaErrorInvalidConfiguration when a tile does not fit).
cudaError_t launch_info_nce_fwd(const InfoNceFwdParams& p, int max_smem, cudaStream_t stream);
cudaError_t launch_info_nce_col_finalize(const InfoNceColFinalizeParams& p, cudaStream_t stream);
cudaError_t launch_info_nce_bwd(const InfoNceBwdParams& p, int max_smem, cudaStream_t stream);
int info_nce_bwd_block_rows(DType dtype);  // rows per backward block (sizes the grad_s partials)
cudaError_t launch_info_nce_fwd_grad(const InfoNceFwdGradParams& p, int max_smem, cudaStream_t stream);

cudaError_t launch_row_norms(const RowNormsParams& p, cudaStream_t stream);
cudaError_t launch_exp_gram_fwd(const ExpGramFwdParams& p, int max_smem, cudaStream_t stream);
cudaError_t launch_exp_gram_bwd(const ExpGramBwdParams& p, int max_smem, cudaStream_t stream);
int exp_gram_fwd_block_rows(DType dtype);  // rows per forward tile (counts the triangle's tiles)

cudaError_t launch_itc_fwd(const ItcFwdParams& p, int max_smem, cudaStream_t stream);
cudaError_t launch_itc_bwd(const ItcBwdParams& p, int max_smem, cudaStream_t stream);
int itc_bwd_block_rows(DType dtype);       // rows per backward block (sizes the grad_s partials)

}  // namespace lsr
