// ALBEF's image-text contrastive loss with momentum distillation and a queue (SPEC 2.6), one
// direction: q [N, D] against a bank [M, D] (M = N + K, rows 0..N-1 the positives), never writing
// the N x M logits.
//
//   X = s q bank^T,  Xm = s q_m bank^T,  P = softmax_rows(X),  Pm = softmax_rows(Xm)
//   Y = alpha Pm + (1 - alpha) I   (a constant: no gradient through the soft targets)
//   loss = -(1/N) sum_ij Y_ij log P_ij = (1/N) sum_i [lse_i - alpha sum_j Pm_ij X_ij - (1 - alpha) X_ii]
// (each row of Y sums to 1). The forward keeps, per row, online statistics of X (max, sum) and of
// Xm (max, sum, and the Pm-weighted gap sum_j Pm_ij (max_i X - X_ij) >= 0, rescaled whenever the
// running max of Xm moves and lifted whenever that of X does). A Pm-weighted sum of X itself would
// cancel against X_ii, both about s, and lose the loss of a well-aligned batch.
//
// Backward: dL/dX = (P - Y) / N, so
//   grad_q = g s / N (P - Y) bank,   grad_s = g / N sum_ij (P - Y)_ij S_ij   (S = q bank^T),
// recomputing both S tiles (q and q_m share each bank tile's loads) from lse and lse_m.
#include "static_switch.h"
#include "tile_gemm.cuh"

namespace lsr {
namespace {

// ------------------------------------------------------------------------------------ forward
template <typename T>
struct ItcFwd {
  using acc_t = typename Types<T>::acc_t;
  static constexpr int BM = std::is_same<T, double>::value ? 64 : 128;
  static constexpr int BN = 64;
  static constexpr int LDS = BN + 8;  // 8 lanes per row, 4 rows per warp: 32 distinct banks
  using Gemm = TileGemm<T, BM, BN, 2>;
  static constexpr size_t kOffS = align_up(Gemm::kSmemBytes);
  static constexpr size_t kSmemBytes = kOffS + sizeof(acc_t) * 2 * BM * LDS;
  static constexpr int kRowsPerRound = kWarps * 4;
  static constexpr int kRounds = BM / kRowsPerRound;
  static_assert(BM % kRowsPerRound == 0 && BN % 8 == 0, "whole rounds, 8 lanes per row");
};

template <typename T>
__global__ void __launch_bounds__(kThreads) itc_fwd_kernel(const ItcFwdParams p) {
  using K = ItcFwd<T>;
  using acc_t = typename K::acc_t;
  constexpr bool kFast = Types<T>::kTensorCore;
  LSR_DYNAMIC_SMEM(smem);
  T* gemm_smem = reinterpret_cast<T*>(smem);
  acc_t* S1 = reinterpret_cast<acc_t*>(smem + K::kOffS);  // q . bank^T
  acc_t* S2 = S1 + K::BM * K::LDS;                         // q_m . bank^T

  const T* q = static_cast<const T*>(p.q);
  const T* q_m = static_cast<const T*>(p.q_m);
  const T* bank = static_cast<const T*>(p.bank);
  const int N = p.n, M = p.m, D = p.d;
  const int r0 = blockIdx.x * K::BM;
  const int a_rows = min(K::BM, N - r0);
  const acc_t s = *static_cast<const acc_t*>(p.scale);
  const acc_t alpha = static_cast<acc_t>(p.alpha);
  const acc_t kNegInf = -INFINITY;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int grp = lane >> 3, j8 = lane & 7;

  // Per row: X statistics (m1, l1); Xm statistics (m2, l2) and w2 = sum_j exp(Xm_ij - m2) (m1 - X_ij);
  // the raw diagonal S[i, i].
  acc_t m1[K::kRounds], l1[K::kRounds], m2[K::kRounds], l2[K::kRounds], w2[K::kRounds], dg[K::kRounds];
#pragma unroll
  for (int rd = 0; rd < K::kRounds; ++rd) {
    m1[rd] = m2[rd] = kNegInf;
    l1[rd] = l2[rd] = w2[rd] = dg[rd] = acc_t(0);
  }

  const T* a_ops[2] = {q + static_cast<int64_t>(r0) * D, q_m + static_cast<int64_t>(r0) * D};
  acc_t* s_ops[2] = {S1, S2};
  for (int c0 = 0; c0 < M; c0 += K::BN) {
    const int b_rows = min(K::BN, M - c0);
    K::Gemm::run(a_ops, a_rows, bank + static_cast<int64_t>(c0) * D, b_rows, D, p.vec, gemm_smem, s_ops, K::LDS);
    __syncthreads();
#pragma unroll
    for (int rd = 0; rd < K::kRounds; ++rd) {
      const int row = rd * K::kRowsPerRound + warp * 4 + grp;
      const acc_t* x1 = S1 + row * K::LDS;
      const acc_t* x2 = S2 + row * K::LDS;
      acc_t t1 = kNegInf, t2 = kNegInf;
      for (int c = j8; c < b_rows; c += 8) {
        t1 = max_acc(t1, mul_rn(s, x1[c]));  // rounded logits (no FMA contraction), as the backward's
        t2 = max_acc(t2, mul_rn(s, x2[c]));
      }
      t1 = group_max<8>(t1);
      t2 = group_max<8>(t2);
      const acc_t n1 = max_acc(m1[rd], t1);
      acc_t e1 = acc_t(0), e2 = acc_t(0), w = acc_t(0);
      for (int c = j8; c < b_rows; c += 8) {
        const acc_t v1 = mul_rn(s, x1[c]);
        const acc_t p2 = exp_acc<kFast>(mul_rn(s, x2[c]) - t2);
        e1 += exp_acc<kFast>(v1 - t1);
        e2 += p2;
        w += p2 * (n1 - v1);
      }
      e1 = group_sum<8>(e1);
      e2 = group_sum<8>(e2);
      w = group_sum<8>(w);
      l1[rd] = l1[rd] * exp_acc<kFast>(m1[rd] - n1) + e1 * exp_acc<kFast>(t1 - n1);
      const acc_t n2 = max_acc(m2[rd], t2);
      const acc_t keep = exp_acc<kFast>(m2[rd] - n2), add = exp_acc<kFast>(t2 - n2);
      // the earlier tiles' gap, measured from the old max of X, lifted to the new one (l2 = 0 on the
      // first tile, where m1 is still -inf)
      const acc_t lift = l2[rd] > acc_t(0) ? (n1 - m1[rd]) * l2[rd] : acc_t(0);
      w2[rd] = (w2[rd] + lift) * keep + w * add;
      l2[rd] = l2[rd] * keep + e2 * add;
      m1[rd] = n1;
      m2[rd] = n2;
      const int dc = r0 + row - c0;  // the positive's column in this tile, if it is here
      if (dc >= 0 && dc < b_rows) dg[rd] = x1[dc];
    }
    __syncthreads();  // S1, S2 are rewritten by the next tile
  }

  if (j8 == 0) {
    acc_t* lse = static_cast<acc_t*>(p.lse);
    acc_t* lse_m = static_cast<acc_t*>(p.lse_m);
    acc_t* row_term = static_cast<acc_t*>(p.row_term);
#pragma unroll
    for (int rd = 0; rd < K::kRounds; ++rd) {
      const int row = rd * K::kRowsPerRound + warp * 4 + grp;
      if (row < a_rows) {
        const acc_t log_l1 = log_acc(l1[rd]);
        const acc_t pos = mul_rn(s, dg[rd]);
        lse[r0 + row] = m1[rd] + log_l1;
        lse_m[r0 + row] = m2[rd] + log_acc(l2[rd]);
        // (LSE - X_ii) - alpha (sum_j Pm_ij X_ij - X_ii), both differences taken at the max of X:
        // sum_j Pm_ij X_ij - X_ii = (m1 - X_ii) - sum_j Pm_ij (m1 - X_ij)
        row_term[r0 + row] = ((m1[rd] - pos) + log_l1) - alpha * ((m1[rd] - pos) - w2[rd] / l2[rd]);
      }
    }
  }
}

// ----------------------------------------------------------------------------------- backward
template <typename T>
__global__ void __launch_bounds__(kThreads) itc_bwd_kernel(const ItcBwdParams p) {
  using K = RowBwdLayout<T, 2>;
  using acc_t = typename K::acc_t;
  constexpr bool kFast = Types<T>::kTensorCore;
  constexpr acc_t kH = HScale<T>::value;
  LSR_DYNAMIC_SMEM(smem);
  T* gemm1_smem = reinterpret_cast<T*>(smem);
  acc_t* S1 = reinterpret_cast<acc_t*>(smem + K::kOffS);
  acc_t* S2 = S1 + K::BM * K::LDS;
  acc_t* scratch = reinterpret_cast<acc_t*>(smem + K::kOffScratch);
  typename K::Gemm2 gemm2;
  gemm2.init(reinterpret_cast<T*>(smem + K::kOffG2));

  const T* q = static_cast<const T*>(p.q);
  const T* q_m = static_cast<const T*>(p.q_m);
  const T* bank = static_cast<const T*>(p.bank);
  const int N = p.n, M = p.m, D = p.d;
  const int r0 = blockIdx.x * K::BM;
  const int a_rows = min(K::BM, N - r0);
  const int d0 = blockIdx.y * K::Gemm2::DC;
  const acc_t s = *static_cast<const acc_t*>(p.scale);
  const acc_t alpha = static_cast<acc_t>(p.alpha);

  const int row = threadIdx.x / K::kTPR, part = threadIdx.x % K::kTPR;
  const bool row_ok = row < a_rows;
  acc_t lse_r = acc_t(0), lse_m_r = acc_t(0);
  if (row_ok) {
    lse_r = static_cast<const acc_t*>(p.lse)[r0 + row];
    lse_m_r = static_cast<const acc_t*>(p.lse_m)[r0 + row];
  }
  acc_t ds_acc = acc_t(0);

  const T* a_ops[2] = {q + static_cast<int64_t>(r0) * D, q_m + static_cast<int64_t>(r0) * D};
  acc_t* s_ops[2] = {S1, S2};
  for (int c0 = 0; c0 < M; c0 += K::BN) {
    const int b_rows = min(K::BN, M - c0);
    const T* b_blk = bank + static_cast<int64_t>(c0) * D;
    gemm2.prefetch(b_blk, b_rows, d0, D, p.vec);
    K::Gemm1::run(a_ops, a_rows, b_blk, b_rows, D, p.vec, gemm1_smem, s_ops, K::LDS);
    __syncthreads();
    acc_t ds_tile = acc_t(0);  // summed per tile, then into ds_acc: a chain of M / BN adds, not M / kTPR
#pragma unroll
    for (int k = 0; k < K::BN / K::kTPR; ++k) {
      const int c = part + K::kTPR * k;
      const acc_t s1 = S1[row * K::LDS + c];
      acc_t h = acc_t(0);  // (P - Y)[row, c]
      if (row_ok && c < b_rows) {
        // the forward's rounded logits (mul_rn: no FMA contraction into the subtraction)
        h = exp_acc<kFast>(mul_rn(s, s1) - lse_r) - alpha * exp_acc<kFast>(mul_rn(s, S2[row * K::LDS + c]) - lse_m_r);
        if (r0 + row == c0 + c) h -= acc_t(1) - alpha;
      }
      ds_tile += h * s1;
      gemm2.sH[row * K::Gemm2::LDH + c] = Convert<T>::from(h * kH);
    }
    ds_acc += ds_tile;
    gemm2.accumulate(d0, D);
    __syncthreads();
  }

  const acc_t g = *static_cast<const acc_t*>(p.grad);
  const acc_t coef = g * s / (static_cast<acc_t>(N) * kH);
  T* grad_q = static_cast<T*>(p.grad_q);
  gemm2.store(a_rows, d0, D, [&](int r, int col, acc_t v) {
    grad_q[static_cast<int64_t>(r0 + r) * D + col] = Convert<T>::from(coef * v);
  });

  if (blockIdx.y == 0) {  // block-uniform; the D-chunks repeat the same S tiles
    const acc_t total = block_sum(ds_acc, scratch);
    if (threadIdx.x == 0) static_cast<acc_t*>(p.ds_partial)[blockIdx.x] = total;
  }
}

// ----------------------------------------------------------------------------------- launchers
template <typename T>
cudaError_t launch_fwd(const ItcFwdParams& p, int max_smem, cudaStream_t stream) {
  using K = ItcFwd<T>;
  return launch_fused(itc_fwd_kernel<T>, ceil_div(p.n, K::BM), K::kSmemBytes, max_smem, stream, p);
}

template <typename T>
cudaError_t launch_bwd(const ItcBwdParams& p, int max_smem, cudaStream_t stream) {
  using K = RowBwdLayout<T, 2>;
  const dim3 grid(ceil_div(p.n, K::BM), ceil_div(p.d, K::Gemm2::DC));
  return launch_fused(itc_bwd_kernel<T>, grid, K::kSmemBytes, max_smem, stream, p);
}

}  // namespace

cudaError_t launch_itc_fwd(const ItcFwdParams& p, int max_smem, cudaStream_t stream) {
  return DTYPE_SWITCH(p.dtype, T, [&] { return launch_fwd<T>(p, max_smem, stream); });
}

cudaError_t launch_itc_bwd(const ItcBwdParams& p, int max_smem, cudaStream_t stream) {
  return DTYPE_SWITCH(p.dtype, T, [&] { return launch_bwd<T>(p, max_smem, stream); });
}

int itc_bwd_block_rows(DType dtype) {
  return dtype == DType::kFloat64 ? RowBwdLayout<double, 2>::BM : RowBwdLayout<float, 2>::BM;
}

}  // namespace lsr
