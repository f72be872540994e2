// The uniformity exp-Gram reduction (SPEC 2.2): E = sum_{j,k} exp(-t ||x_j - x_k||^2), the pair
// j = k included, with ||x_j - x_k||^2 = n_j + n_k - 2 S[j, k], n_j = |x_j|^2, S = x x^T.
//
// Forward: the summand is symmetric, so only tiles on or above the diagonal are computed, an
// off-diagonal tile counting twice. Persistent blocks walk the upper-triangle tiles (enumerated
// column by column) and write one partial sum each; the host sums the partials.
//
// The pair j = k has distance 0 by definition: its term is exactly 1 (n_j + n_j - 2 S[j, j] from two
// differently ordered fp32 sums is only ~1e-7, which left N = 1's gradient, exactly 0, at ~1e-6).
//
// Backward: with K[j, k] = exp(-t (n_j + n_k - 2 S[j, k])) (symmetric),
//   dE/dx_j = -4 t (rowsum_j x_j - sum_k K[j, k] x_k),   rowsum_j = sum_k K[j, k].
// A block owns BM rows and walks over all column tiles (a row-owning block needs no atomics; a
// triangle-only backward would have to scatter into other blocks' rows).
#include "static_switch.h"
#include "tile_gemm.cuh"

namespace lsr {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) row_norms_kernel(const RowNormsParams p) {
  using acc_t = typename Types<T>::acc_t;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarps + warp;
  if (row >= p.n) return;  // whole warp: no block-level synchronisation follows
  const T* xr = static_cast<const T*>(p.x) + static_cast<int64_t>(row) * p.d;
  acc_t sum = acc_t(0);
  for (int k = lane; k < p.d; k += 32) {
    const acc_t v = to_acc(xr[k]);
    sum = fma(v, v, sum);
  }
  sum = group_sum<32>(sum);
  if (lane == 0) static_cast<acc_t*>(p.norms)[row] = sum;
}

// ------------------------------------------------------------------------------------ forward
template <typename T>
struct ExpGramFwd {
  using acc_t = typename Types<T>::acc_t;
  static constexpr int BM = std::is_same<T, double>::value ? 64 : 128;
  static constexpr int BN = BM;
  static constexpr int LDS = BN + 4;  // read along rows by consecutive threads
  using Gemm = TileGemm<T, BM, BN, 1>;
  static constexpr size_t kOffS = align_up(Gemm::kSmemBytes);
  static constexpr size_t kOffScratch = align_up(kOffS + sizeof(acc_t) * BM * LDS);
  static constexpr size_t kSmemBytes = kOffScratch + sizeof(acc_t) * kWarps;
  static constexpr int kRowParts = kThreads / BN;  // threads sharing one column of the tile
  static_assert(kThreads % BN == 0, "whole columns per thread group");
};

// Tile k of the upper triangle, enumerated column by column: (0,0), (0,1), (1,1), (0,2), ...
// so tile column bj starts at k = bj (bj + 1) / 2 and holds rows bi = 0..bj.
__device__ __forceinline__ void decode_upper_tile(int64_t k, int64_t& bi, int64_t& bj) {
  int64_t col = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(k) + 1.0) - 1.0) * 0.5);
  while (col * (col + 1) / 2 > k) --col;  // fix the floating-point estimate
  while ((col + 1) * (col + 2) / 2 <= k) ++col;
  bj = col;
  bi = k - col * (col + 1) / 2;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kTwoBlocksPerSM) exp_gram_fwd_kernel(const ExpGramFwdParams p) {
  using K = ExpGramFwd<T>;
  using acc_t = typename K::acc_t;
  constexpr bool kFast = Types<T>::kTensorCore;
  LSR_DYNAMIC_SMEM(smem);
  T* gemm_smem = reinterpret_cast<T*>(smem);
  acc_t* S = reinterpret_cast<acc_t*>(smem + K::kOffS);
  acc_t* scratch = reinterpret_cast<acc_t*>(smem + K::kOffScratch);

  const T* x = static_cast<const T*>(p.x);
  const acc_t* norms = static_cast<const acc_t*>(p.norms);
  const int N = p.n, D = p.d;
  const acc_t t = static_cast<acc_t>(p.t);
  const int64_t nb = ceil_div(N, K::BM);
  const int64_t num_tiles = nb * (nb + 1) / 2;
  const int col = threadIdx.x % K::BN, rpart = threadIdx.x / K::BN;

  // One add per tile per thread, over up to nb^2 / (2 grid) tiles (10^6 at N = 4M): a float running
  // sum stops growing there (each tile's term falls under half an ulp), so it is a double.
  double local = 0.0;
  acc_t* s_ops[1] = {S};
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {  // block-uniform loop
    int64_t bi, bj;
    decode_upper_tile(tile, bi, bj);
    const int r0 = static_cast<int>(bi) * K::BM, c0 = static_cast<int>(bj) * K::BN;
    const int a_rows = min(K::BM, N - r0), b_rows = min(K::BN, N - c0);
    const T* a_ops[1] = {x + static_cast<int64_t>(r0) * D};
    K::Gemm::run(a_ops, a_rows, x + static_cast<int64_t>(c0) * D, b_rows, D, p.vec, gemm_smem, s_ops, K::LDS);
    __syncthreads();
    if (col < b_rows) {
      const acc_t n_c = norms[c0 + col];
      acc_t sum = acc_t(0);
      const int diag_r = bi == bj ? col : -1;  // the tile's row that is this column's own sample
      for (int r = rpart; r < a_rows; r += K::kRowParts)
        sum += r == diag_r ? acc_t(1) : exp_acc<kFast>(-t * (norms[r0 + r] + n_c - acc_t(2) * S[r * K::LDS + col]));
      const acc_t mirrored = bi == bj ? acc_t(1) : acc_t(2);  // an off-diagonal tile stands for its mirror too
      local += static_cast<double>(mirrored * sum);
    }
    __syncthreads();  // S is rewritten by the next tile
  }
  const acc_t total = block_sum(static_cast<acc_t>(local), scratch);
  if (threadIdx.x == 0) static_cast<acc_t*>(p.partials)[blockIdx.x] = total;
}

// ----------------------------------------------------------------------------------- backward
template <typename T>
__global__ void __launch_bounds__(kThreads, kTwoBlocksPerSM) exp_gram_bwd_kernel(const ExpGramBwdParams p) {
  using K = RowBwdLayout<T, 1>;
  using acc_t = typename K::acc_t;
  constexpr bool kFast = Types<T>::kTensorCore;
  constexpr acc_t kH = HScale<T>::value;
  static_assert(K::BN == K::BM, "the pair (j, j) lies in the tile c0 == r0");
  LSR_DYNAMIC_SMEM(smem);
  T* gemm1_smem = reinterpret_cast<T*>(smem);
  acc_t* S = reinterpret_cast<acc_t*>(smem + K::kOffS);
  acc_t* row_sums = reinterpret_cast<acc_t*>(smem + K::kOffRows);
  typename K::Gemm2 gemm2;
  gemm2.init(reinterpret_cast<T*>(smem + K::kOffG2));

  const T* x = static_cast<const T*>(p.x);
  const acc_t* norms = static_cast<const acc_t*>(p.norms);
  const int N = p.n, D = p.d;
  const acc_t t = static_cast<acc_t>(p.t);
  const int r0 = blockIdx.x * K::BM;
  const int a_rows = min(K::BM, N - r0);
  const int d0 = blockIdx.y * K::Gemm2::DC;

  const int row = threadIdx.x / K::kTPR, part = threadIdx.x % K::kTPR;
  const bool row_ok = row < a_rows;
  const acc_t n_r = row_ok ? norms[r0 + row] : acc_t(0);
  acc_t row_sum = acc_t(0);

  const T* a_ops[1] = {x + static_cast<int64_t>(r0) * D};
  acc_t* s_ops[1] = {S};
  for (int c0 = 0; c0 < N; c0 += K::BN) {
    const int b_rows = min(K::BN, N - c0);
    const T* b_blk = x + static_cast<int64_t>(c0) * D;
    gemm2.prefetch(b_blk, b_rows, d0, D, p.vec);
    K::Gemm1::run(a_ops, a_rows, b_blk, b_rows, D, p.vec, gemm1_smem, s_ops, K::LDS);
    __syncthreads();
    acc_t tile_sum = acc_t(0);  // per tile, then into row_sum: a chain of N / BN adds, not N / kTPR
#pragma unroll
    for (int k = 0; k < K::BN / K::kTPR; ++k) {
      const int c = part + K::kTPR * k;
      acc_t kv = acc_t(0);
      if (row_ok && c < b_rows) {
        // the pair (j, j) sits in the tile c0 == r0 (BN == BM): exactly 1, its two terms cancel exactly
        kv = c0 == r0 && c == row ? acc_t(1)
                                  : exp_acc<kFast>(-t * (n_r + norms[c0 + c] - acc_t(2) * S[row * K::LDS + c]));
      }
      tile_sum += kv;
      gemm2.sH[row * K::Gemm2::LDH + c] = Convert<T>::from(kv * kH);
    }
    row_sum += tile_sum;
    gemm2.accumulate(d0, D);
    __syncthreads();
  }

  row_sum = group_sum<K::kTPR>(row_sum);  // a row's kTPR threads are consecutive lanes
  if (part == 0) row_sums[row] = row_sum;
  __syncthreads();

  const acc_t coef = acc_t(-4) * t * *static_cast<const acc_t*>(p.grad);
  T* grad_x = static_cast<T*>(p.grad_x);
  gemm2.store(a_rows, d0, D, [&](int r, int col, acc_t v) {
    const int64_t idx = static_cast<int64_t>(r0 + r) * D + col;
    grad_x[idx] = Convert<T>::from(coef * (row_sums[r] * to_acc(x[idx]) - v / kH));
  });
}

// ----------------------------------------------------------------------------------- launchers
template <typename T>
cudaError_t launch_fwd(const ExpGramFwdParams& p, int max_smem, cudaStream_t stream) {
  return launch_fused(exp_gram_fwd_kernel<T>, p.grid, ExpGramFwd<T>::kSmemBytes, max_smem, stream, p);
}

template <typename T>
cudaError_t launch_bwd(const ExpGramBwdParams& p, int max_smem, cudaStream_t stream) {
  using K = RowBwdLayout<T, 1>;
  const dim3 grid(ceil_div(p.n, K::BM), ceil_div(p.d, K::Gemm2::DC));
  return launch_fused(exp_gram_bwd_kernel<T>, grid, K::kSmemBytes, max_smem, stream, p);
}

}  // namespace

cudaError_t launch_row_norms(const RowNormsParams& p, cudaStream_t stream) {
  return DTYPE_SWITCH(p.dtype, T, [&] {
    LSR_LAUNCH(row_norms_kernel<T>, ceil_div(p.n, kWarps), kThreads, 0, stream, p);
    return LSR_LAST_ERROR();
  });
}

cudaError_t launch_exp_gram_fwd(const ExpGramFwdParams& p, int max_smem, cudaStream_t stream) {
  return DTYPE_SWITCH(p.dtype, T, [&] { return launch_fwd<T>(p, max_smem, stream); });
}

cudaError_t launch_exp_gram_bwd(const ExpGramBwdParams& p, int max_smem, cudaStream_t stream) {
  return DTYPE_SWITCH(p.dtype, T, [&] { return launch_bwd<T>(p, max_smem, stream); });
}

int exp_gram_fwd_block_rows(DType dtype) {
  return dtype == DType::kFloat64 ? ExpGramFwd<double>::BM : ExpGramFwd<float>::BM;
}

}  // namespace lsr
