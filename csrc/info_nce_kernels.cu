// Fused InfoNCE (SPEC 2.1 / 2.2): CE(X) and (CE(X) + CE(X^T)) / 2 for X = s a b^T, never writing X.
// One-way, b may have m >= n rows with the positive of row i at column i + pos_off (one rank's rows
// against every rank's columns); below, "X[i, i]" means that positive.
//
// Forward, one pass over the tiles of X (a block owns BM rows of a and walks over all column tiles):
//   row statistics   lse_row[i] = logsumexp_j X[i, j]   online max / sum per row, kept in registers;
//   column statistics (symmetric) the same reduction down each tile's columns, merged across blocks
//                    into one packed (max, sum) fp32 pair per column with a 64-bit atomicCAS
//                    (blocks start at staggered column tiles, so few contend for one slot);
//   diagonal         X[i, i] read from the tile that holds it.
//   CE(X) = mean_i (lse_row[i] - X[i, i]);  CE(X^T) = mean_j (lse_col[j] - X[j, j]).
// fp64 has no 128-bit CAS for its pair, so there the column statistics are the row statistics of
// the swapped problem (a second launch); fp64 is the gradcheck path, not a performance path.
//
// Backward, with g the upstream gradient and n_ce the number of CE terms (1 or 2):
//   dL/dX[i, j] = g / (n_ce N) * (P_row[i, j] + [sym] P_col[i, j] - n_ce [i == j]),
//   P_row = exp(X - lse_row[i]),  P_col = exp(X - lse_col[j]);
//   grad_a = s dL/dX b,  grad_b = s dL/dX^T a,  grad_s = sum_ij dL/dX[i, j] S[i, j].
// One kernel computes "grad of the left operand": launched on (a, b) for grad_a and grad_s, and on
// (b, a) with the roles of the statistics swapped for grad_b. Each launch recomputes the S tiles
// from the saved statistics; nothing N x N is stored.
//
// One-way with a's gradient to come (info_nce_fwd_grad_kernel): P_row is final within a row
// block's pass, so that pass also accumulates sum_j exp(X[i, j] - ref_i) b_j and its scale sum
// (FlashAttention's forward with V = b) and returns grad_a / (g s / N) with the loss; the backward
// then launches only for grad_b: 4 N M D products instead of 5.
#include "static_switch.h"
#include "tile_gemm.cuh"

namespace lsr {
namespace {

// ------------------------------------------------------------------------------------ forward
template <typename T, bool FUSED>
struct InfoNceFwd {
  using acc_t = typename Types<T>::acc_t;
  static constexpr int BM = std::is_same<T, double>::value ? 64 : 128;
  static constexpr int BN = BM;
  // Row reductions: 8 lanes per row, 4 rows per warp. A row stride of 8 (mod 32) words puts the
  // 4 rows x 8 lanes of a warp on 32 distinct banks; column reductions read 32 consecutive words.
  static constexpr int LDS = BN + 8;
  using Gemm = TileGemm<T, BM, BN, 1>;
  static constexpr size_t kOffS = align_up(Gemm::kSmemBytes);
  static constexpr size_t kSmemBytes = kOffS + sizeof(acc_t) * BM * LDS;
  // Fused: warps 0-3 reduce rows, warps 4-7 reduce columns (each thread one column of the tile).
  static constexpr int kRowWarps = FUSED ? kWarps / 2 : kWarps;
  static constexpr int kRowsPerRound = kRowWarps * 4;
  static constexpr int kRounds = BM / kRowsPerRound;
  static constexpr int kColThreads = kThreads - kRowWarps * 32;
  static constexpr int kColParts = FUSED ? kColThreads / BN : 1;  // threads sharing one column
  // Fused: a block starts its walk over the column tiles at one of kStartPhases evenly spaced tiles,
  // so the resident blocks' CAS merges of column statistics spread over that many column ranges
  // instead of all contending for the same BN slots; a phase's blocks still share b tiles in L2.
  static constexpr int kStartPhases = FUSED ? 8 : 1;
  static_assert(BM % kRowsPerRound == 0, "whole rounds of rows");
  static_assert(BN % 8 == 0, "8 lanes per row");
  static_assert(!FUSED || (kColThreads % BN == 0 && kColParts >= 1), "whole columns per thread group");
};

__device__ __forceinline__ unsigned long long pack_stats(float m, float l) {
  return (static_cast<unsigned long long>(__float_as_uint(l)) << 32) | __float_as_uint(m);
}

// slot <- merge(slot, (m, l)) for a (max, sum of exp(x - max)) pair; the merge is associative and
// commutative, so blocks may arrive in any order. Initial value: (-inf, 0).
__device__ void merge_column_stats(unsigned long long* slot, float m, float l) {
  unsigned long long seen = *reinterpret_cast<volatile unsigned long long*>(slot);
  while (true) {
    const float cur_m = __uint_as_float(static_cast<unsigned>(seen & 0xffffffffull));
    const float cur_l = __uint_as_float(static_cast<unsigned>(seen >> 32));
    const float new_m = fmaxf(cur_m, m);  // m is finite, so new_m is finite
    const float new_l = cur_l * expf(cur_m - new_m) + l * expf(m - new_m);
    const unsigned long long prev = atomicCAS(slot, seen, pack_stats(new_m, new_l));
    if (prev == seen) return;
    seen = prev;
  }
}

template <typename T, bool FUSED>
__global__ void __launch_bounds__(kThreads, kTwoBlocksPerSM) info_nce_fwd_kernel(const InfoNceFwdParams p) {
  using K = InfoNceFwd<T, FUSED>;
  using acc_t = typename K::acc_t;
  constexpr bool kFast = Types<T>::kTensorCore;
  LSR_DYNAMIC_SMEM(smem);
  T* gemm_smem = reinterpret_cast<T*>(smem);
  acc_t* S = reinterpret_cast<acc_t*>(smem + K::kOffS);

  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int N = p.n, M = p.m, D = p.d;
  const int r0 = blockIdx.x * K::BM;
  const int a_rows = min(K::BM, N - r0);
  const acc_t s = *static_cast<const acc_t*>(p.scale);
  const acc_t kNegInf = -INFINITY;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool row_thread = warp < K::kRowWarps;
  const int grp = lane >> 3, j8 = lane & 7;  // row group within the warp, lane within the group

  acc_t run_m[K::kRounds], run_l[K::kRounds], diag[K::kRounds];
#pragma unroll
  for (int rd = 0; rd < K::kRounds; ++rd) {
    run_m[rd] = kNegInf;
    run_l[rd] = acc_t(0);
    diag[rd] = acc_t(0);
  }

  const T* a_ops[1] = {a + static_cast<int64_t>(r0) * D};
  acc_t* s_ops[1] = {S};
  const int n_tiles = (M + K::BN - 1) / K::BN;
  const int first = static_cast<int>(static_cast<int64_t>(blockIdx.x % K::kStartPhases) * n_tiles / K::kStartPhases);
  for (int t = 0; t < n_tiles; ++t) {
    const int c0 = (first + t < n_tiles ? first + t : first + t - n_tiles) * K::BN;
    const int b_rows = min(K::BN, M - c0);
    K::Gemm::run(a_ops, a_rows, b + static_cast<int64_t>(c0) * D, b_rows, D, p.vec, gemm_smem, s_ops, K::LDS);
    __syncthreads();

    if (row_thread) {
      // Rows past a_rows hold zeros and are never stored; columns past b_rows are skipped.
#pragma unroll
      for (int rd = 0; rd < K::kRounds; ++rd) {
        const int row = rd * K::kRowsPerRound + warp * 4 + grp;
        const acc_t* srow = S + row * K::LDS;
        acc_t tile_m = kNegInf;
        for (int c = j8; c < b_rows; c += 8) tile_m = max_acc(tile_m, mul_rn(s, srow[c]));
        tile_m = group_max<8>(tile_m);  // finite: every tile has at least one valid column
        acc_t tile_l = acc_t(0);
        for (int c = j8; c < b_rows; c += 8) tile_l += exp_acc<kFast>(mul_rn(s, srow[c]) - tile_m);
        tile_l = group_sum<8>(tile_l);
        const acc_t new_m = max_acc(run_m[rd], tile_m);
        run_l[rd] = run_l[rd] * exp_acc<kFast>(run_m[rd] - new_m) + tile_l * exp_acc<kFast>(tile_m - new_m);
        run_m[rd] = new_m;
        const int dc = r0 + row + p.pos_off - c0;  // the positive's column in this tile, if it is here
        if (dc >= 0 && dc < b_rows) diag[rd] = srow[dc];
      }
    } else {
      if constexpr (FUSED) {
        const int ct = threadIdx.x - K::kRowWarps * 32;
        const int col = ct % K::BN, part = ct / K::BN;
        if (col < b_rows) {
          acc_t tile_m = kNegInf;
          for (int r = part; r < a_rows; r += K::kColParts) tile_m = max_acc(tile_m, mul_rn(s, S[r * K::LDS + col]));
          if (tile_m > kNegInf) {  // false only for a part without valid rows
            acc_t tile_l = acc_t(0);
            for (int r = part; r < a_rows; r += K::kColParts)
              tile_l += exp_acc<kFast>(mul_rn(s, S[r * K::LDS + col]) - tile_m);
            merge_column_stats(p.col_stats + c0 + col, tile_m, tile_l);
          }
        }
      }
    }
    __syncthreads();  // S is rewritten by the next tile
  }

  if (row_thread && j8 == 0) {
    acc_t* lse_row = static_cast<acc_t*>(p.lse_row);
    acc_t* row_term = static_cast<acc_t*>(p.row_term);
#pragma unroll
    for (int rd = 0; rd < K::kRounds; ++rd) {
      const int row = rd * K::kRowsPerRound + warp * 4 + grp;
      if (row < a_rows) {
        // (max - X[i, i]) + log(sum): no cancellation of two ~s-sized numbers when the loss is small
        const acc_t log_l = log_acc(run_l[rd]);
        lse_row[r0 + row] = run_m[rd] + log_l;
        row_term[r0 + row] = (run_m[rd] - mul_rn(s, diag[rd])) + log_l;
        if constexpr (FUSED) static_cast<acc_t*>(p.diag)[r0 + row] = diag[rd];
      }
    }
  }
}

__global__ void info_nce_col_finalize_kernel(const InfoNceColFinalizeParams p) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= p.n) return;
  const unsigned long long packed = p.col_stats[j];
  const float m = __uint_as_float(static_cast<unsigned>(packed & 0xffffffffull));
  const float l = __uint_as_float(static_cast<unsigned>(packed >> 32));
  const float log_l = logf(l);
  p.lse_col[j] = m + log_l;
  p.col_term[j] = (m - mul_rn(p.scale[0], p.diag[j])) + log_l;
}

// ----------------------------------------------------------------------------------- backward
// fp16/bf16 with both softmaxes (the symmetric loss): one exponential per logit, as in the Triton
// backward (softmax_ce.FACTORED_EXP_SPREAD): exp(x - lse_r) + exp(x - lse_c) = exp(x - R) *
// (exp(R - lse_r) + exp(R - lse_c)) with R the block's largest row LSE (>= every logit), while every
// R - lse is at most kFactorSpread (natural units: 64 * ln 2, so a term that __expf flushes to 0,
// below 2^-126, stands for less than 2^-62); a wider tile takes two exponentials per logit (and
// leaves unused the row factors, which may then have overflowed).
constexpr float kFactorSpread = 44.3614195558365f;

template <typename T, bool USE_ROW, bool USE_COL>
__global__ void __launch_bounds__(kThreads, kTwoBlocksPerSM) info_nce_bwd_kernel(const InfoNceBwdParams p) {
  using K = RowBwdLayout<T, 1>;
  using acc_t = typename K::acc_t;
  constexpr bool kFast = Types<T>::kTensorCore;
  constexpr acc_t kH = HScale<T>::value;
  LSR_DYNAMIC_SMEM(smem);
  T* gemm1_smem = reinterpret_cast<T*>(smem);
  acc_t* S = reinterpret_cast<acc_t*>(smem + K::kOffS);
  acc_t* scratch = reinterpret_cast<acc_t*>(smem + K::kOffScratch);
  typename K::Gemm2 gemm2;
  gemm2.init(reinterpret_cast<T*>(smem + K::kOffG2));

  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  const acc_t* lse_a = static_cast<const acc_t*>(p.lse_a);
  const acc_t* lse_b = static_cast<const acc_t*>(p.lse_b);
  const int N = p.n, M = p.m, D = p.d;
  const int r0 = blockIdx.x * K::BM;
  const int a_rows = min(K::BM, N - r0);
  const int d0 = blockIdx.y * K::Gemm2::DC;
  const acc_t s = *static_cast<const acc_t*>(p.scale);

  const int row = threadIdx.x / K::kTPR, part = threadIdx.x % K::kTPR;
  const bool row_ok = row < a_rows;
  const int pos_col = r0 + row + p.pos_off;  // this row's positive column (hoisted: one register)
  acc_t lse_r = acc_t(0);
  if (USE_ROW && row_ok) lse_r = lse_a[r0 + row];
  acc_t ds_acc = acc_t(0);

  constexpr bool kFactor = kFast && USE_ROW && USE_COL;
  static_assert(K::BN <= K::BM, "the column factors use the per-row buffer");
  acc_t* col_factor = reinterpret_cast<acc_t*>(smem + K::kOffRows);  // exp(R - lse_c) of the tile
  acc_t top = acc_t(0), row_factor = acc_t(0);
  bool rows_narrow = false;
  if constexpr (kFactor) {
    const acc_t kNegInf = -INFINITY;
    top = block_max(row_ok ? lse_r : kNegInf, scratch);
    rows_narrow = top + block_max(row_ok ? -lse_r : kNegInf, scratch) <= kFactorSpread;
    if (row_ok) row_factor = exp_acc<true>(top - lse_r);
  }

  const T* a_ops[1] = {A + static_cast<int64_t>(r0) * D};
  acc_t* s_ops[1] = {S};
  for (int c0 = 0; c0 < M; c0 += K::BN) {
    const int b_rows = min(K::BN, M - c0);
    const T* b_blk = B + static_cast<int64_t>(c0) * D;
    gemm2.prefetch(b_blk, b_rows, d0, D, p.vec);  // B[c0:c0+BN, d0:d0+DC], overlapped with the S tile
    bool col_wide = false;
    if (kFactor && threadIdx.x < K::BN) {  // the previous tile's last read of col_factor was before a barrier
      const int c = threadIdx.x;
      const acc_t gap = c < b_rows ? top - lse_b[c0 + c] : acc_t(0);
      col_wide = gap > kFactorSpread;
      col_factor[c] = c < b_rows && !col_wide ? exp_acc<true>(gap) : acc_t(0);
    }
    K::Gemm1::run(a_ops, a_rows, b_blk, b_rows, D, p.vec, gemm1_smem, s_ops, K::LDS);
    bool factored = false;  // block-uniform
    if constexpr (kFactor) {
      factored = !__syncthreads_or(col_wide) && rows_narrow;
    } else {
      __syncthreads();
    }
    acc_t ds_tile = acc_t(0);  // summed per tile, then into ds_acc: a chain of M / BN adds, not M / kTPR
#pragma unroll
    for (int k = 0; k < K::BN / K::kTPR; ++k) {
      const int c = part + K::kTPR * k;
      const acc_t sv = S[row * K::LDS + c];
      acc_t h = acc_t(0);  // invalid rows / columns: weight 0 (their B rows are zeros as well)
      if (row_ok && c < b_rows) {
        // the forward's rounded logit: a lone positive's h is exactly 0 (factored: when the block's
        // log-sum-exps are all equal, e.g. N = 1; otherwise the factors round)
        const acc_t x = mul_rn(s, sv);
        if (factored) {
          h = exp_acc<true>(x - top) * (row_factor + col_factor[c]);
        } else {
          if (USE_ROW) h += exp_acc<kFast>(x - lse_r);
          if (USE_COL) h += exp_acc<kFast>(x - lse_b[c0 + c]);
        }
        if (pos_col - c0 == c) h -= acc_t(int(USE_ROW) + int(USE_COL));
      }
      ds_tile += h * sv;
      gemm2.sH[row * K::Gemm2::LDH + c] = Convert<T>::from(h * kH);
    }
    ds_acc += ds_tile;
    gemm2.accumulate(d0, D);
    __syncthreads();  // sH, sB2 and S are rewritten by the next tile
  }

  const acc_t g = *static_cast<const acc_t*>(p.grad);
  const acc_t coef = g * s * static_cast<acc_t>(p.inv_norm) / kH;
  T* grad_a = static_cast<T*>(p.grad_a);
  gemm2.store(a_rows, d0, D, [&](int r, int col, acc_t v) {
    grad_a[static_cast<int64_t>(r0 + r) * D + col] = Convert<T>::from(coef * v);
  });

  if (p.ds_partial != nullptr && blockIdx.y == 0) {  // block-uniform; the D-chunks repeat the same S
    const acc_t total = block_sum(ds_acc, scratch);
    if (threadIdx.x == 0) static_cast<acc_t*>(p.ds_partial)[blockIdx.x] = total;
  }
}

// --------------------------------------------------------------- one-way forward with the gradient
// Lazy rescaling (as FlashAttention-4 does): exponentials are taken against a per-row reference
// max that moves only when a tile's max exceeds it by more than kTau, so the accumulated rows are
// rescaled (a block-wide vote, then every thread's accumulator registers) only a few times per
// row. Every weight stays <= e^kTau; for fp16, kPScale moves the weights 4 bits further from its
// subnormals (below e^-12.5 they still are one: < 2e-9 each against a row sum >= 1) while
// e^kTau * kPScale < 65504. bf16, fp32 and fp64 need no scale.
template <typename T>
struct FwdGradWeights {
  static constexpr float kTau = 8.0f;
  static constexpr float kPScale = std::is_same<T, __half>::value ? 16.0f : 1.0f;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, kTwoBlocksPerSM) info_nce_fwd_grad_kernel(const InfoNceFwdGradParams p) {
  using K = RowBwdLayout<T, 1>;
  using acc_t = typename K::acc_t;
  constexpr bool kFast = Types<T>::kTensorCore;
  constexpr acc_t kTau = FwdGradWeights<T>::kTau;
  constexpr acc_t kPScale = FwdGradWeights<T>::kPScale;
  LSR_DYNAMIC_SMEM(smem);
  T* gemm1_smem = reinterpret_cast<T*>(smem);
  acc_t* S = reinterpret_cast<acc_t*>(smem + K::kOffS);
  acc_t* rows = reinterpret_cast<acc_t*>(smem + K::kOffRows);
  typename K::Gemm2 gemm2;
  gemm2.init(reinterpret_cast<T*>(smem + K::kOffG2));

  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  const int N = p.n, M = p.m, D = p.d;
  const int r0 = blockIdx.x * K::BM;
  const int a_rows = min(K::BM, N - r0);
  const int d0 = blockIdx.y * K::Gemm2::DC;
  const acc_t s = *static_cast<const acc_t*>(p.scale);
  const acc_t kNegInf = -INFINITY;

  const int row = threadIdx.x / K::kTPR, part = threadIdx.x % K::kTPR;
  const bool row_ok = row < a_rows;
  const int pos_col = r0 + row + p.pos_off;
  // Per row, replicated in its kTPR threads: the reference max; per thread: partial sums over its
  // columns of the weights h = exp(x - ref), of h S, and the positive's S. The positive stays out of
  // the tensor-core product, so P_pos is never rounded to T (on a well-aligned batch 1 - P_pos is
  // far below fp16's step at 1): the kernel writes sum_(j != pos) P_j b_j, and the host subtracts
  // (1 - P_pos) b_pos with 1 - P_pos = -expm1(-row_term) (row_term = lse - X_pos, formed without
  // cancellation).
  acc_t ref = kNegInf, l_part = acc_t(0), w_part = acc_t(0), diag_part = acc_t(0);

  const T* a_ops[1] = {A + static_cast<int64_t>(r0) * D};
  acc_t* s_ops[1] = {S};
  for (int c0 = 0; c0 < M; c0 += K::BN) {
    const int b_rows = min(K::BN, M - c0);
    const T* b_blk = B + static_cast<int64_t>(c0) * D;
    gemm2.prefetch(b_blk, b_rows, d0, D, p.vec);
    K::Gemm1::run(a_ops, a_rows, b_blk, b_rows, D, p.vec, gemm1_smem, s_ops, K::LDS);
    __syncthreads();
    acc_t tile_m = kNegInf;
#pragma unroll
    for (int k = 0; k < K::BN / K::kTPR; ++k) {
      const int c = part + K::kTPR * k;
      if (row_ok && c < b_rows) tile_m = max_acc(tile_m, mul_rn(s, S[row * K::LDS + c]));
    }
    tile_m = group_max<K::kTPR>(tile_m);
    const bool bump = tile_m > ref + kTau;  // never for invalid rows (tile_m = -inf)
    acc_t factor = acc_t(1);
    if (bump) {
      factor = exp_acc<kFast>(ref - tile_m);  // 0 on the first tile (ref = -inf)
      ref = tile_m;
      l_part *= factor;
      w_part *= factor;
    }
    if (part == 0) rows[row] = factor;
    // block-uniform: rescale what the earlier tiles accumulated (nothing yet on the first tile)
    if (__syncthreads_or(bump && c0 > 0)) gemm2.scale_rows(rows);
    acc_t l_tile = acc_t(0), w_tile = acc_t(0);  // per tile, then into the running sums (shorter chains)
#pragma unroll
    for (int k = 0; k < K::BN / K::kTPR; ++k) {
      const int c = part + K::kTPR * k;
      const acc_t sv = S[row * K::LDS + c];
      acc_t h = acc_t(0);  // invalid rows / columns: weight 0 (their B rows are zeros as well)
      acc_t h_op = acc_t(0);  // the product's operand: the positive left out
      if (row_ok && c < b_rows) {
        h = exp_acc<kFast>(mul_rn(s, sv) - ref);
        if (pos_col - c0 == c) {
          diag_part = sv;
        } else {
          h_op = h * kPScale;
        }
      }
      l_tile += h;
      w_tile += h * sv;
      gemm2.sH[row * K::Gemm2::LDH + c] = Convert<T>::from(h_op);
    }
    l_part += l_tile;
    w_part += w_tile;
    gemm2.accumulate(d0, D);
    __syncthreads();  // sH, sB2, S and rows are rewritten by the next tile
  }

  const acc_t l = group_sum<K::kTPR>(l_part);
  const acc_t w = group_sum<K::kTPR>(w_part);
  const acc_t diag = group_sum<K::kTPR>(diag_part);  // one thread of the row holds the positive
  if (part == 0) rows[row] = row_ok ? l : acc_t(1);
  if (part == 0 && row_ok && blockIdx.y == 0) {  // the D-chunks repeat the same statistics
    const acc_t log_l = log_acc(l);
    static_cast<acc_t*>(p.lse_row)[r0 + row] = ref + log_l;
    static_cast<acc_t*>(p.row_term)[r0 + row] = (ref - mul_rn(s, diag)) + log_l;
    static_cast<acc_t*>(p.ds_row)[r0 + row] = w / l - diag;
  }
  __syncthreads();
  // kept in acc_t: the host subtracts (1 - P_pos) b_pos, the backward scales it by g s / N and
  // rounds to T once
  acc_t* grad_unit = static_cast<acc_t*>(p.grad_unit);
  gemm2.store(a_rows, d0, D, [&](int r, int col, acc_t v) {
    grad_unit[static_cast<int64_t>(r0 + r) * D + col] = v / (kPScale * rows[r]);
  });
}

// ----------------------------------------------------------------------------------- launchers
template <typename T, bool FUSED>
cudaError_t launch_fwd(const InfoNceFwdParams& p, int max_smem, cudaStream_t stream) {
  using K = InfoNceFwd<T, FUSED>;
  return launch_fused(info_nce_fwd_kernel<T, FUSED>, ceil_div(p.n, K::BM), K::kSmemBytes, max_smem, stream, p);
}

template <typename T, bool USE_ROW, bool USE_COL>
cudaError_t launch_bwd(const InfoNceBwdParams& p, int max_smem, cudaStream_t stream) {
  using K = RowBwdLayout<T, 1>;
  const dim3 grid(ceil_div(p.n, K::BM), ceil_div(p.d, K::Gemm2::DC));
  return launch_fused(info_nce_bwd_kernel<T, USE_ROW, USE_COL>, grid, K::kSmemBytes, max_smem, stream, p);
}

template <typename T>
cudaError_t dispatch_fwd(const InfoNceFwdParams& p, int max_smem, cudaStream_t stream) {
  if constexpr (std::is_same<T, double>::value) {
    if (p.fused_columns) return cudaErrorInvalidValue;  // no 128-bit CAS: the host swaps instead
    return launch_fwd<T, false>(p, max_smem, stream);
  } else {
    return BOOL_SWITCH(p.fused_columns, FUSED, [&] { return launch_fwd<T, FUSED>(p, max_smem, stream); });
  }
}

}  // namespace

cudaError_t launch_info_nce_fwd(const InfoNceFwdParams& p, int max_smem, cudaStream_t stream) {
  return DTYPE_SWITCH(p.dtype, T, [&] { return dispatch_fwd<T>(p, max_smem, stream); });
}

cudaError_t launch_info_nce_col_finalize(const InfoNceColFinalizeParams& p, cudaStream_t stream) {
  constexpr int kBlock = 256;
  LSR_LAUNCH(info_nce_col_finalize_kernel, ceil_div(p.n, kBlock), kBlock, 0, stream, p);
  return LSR_LAST_ERROR();
}

cudaError_t launch_info_nce_bwd(const InfoNceBwdParams& p, int max_smem, cudaStream_t stream) {
  return DTYPE_SWITCH(p.dtype, T, [&] {
    if (p.use_row && p.use_col) return launch_bwd<T, true, true>(p, max_smem, stream);
    if (p.use_row) return launch_bwd<T, true, false>(p, max_smem, stream);
    if (p.use_col) return launch_bwd<T, false, true>(p, max_smem, stream);
    return cudaErrorInvalidValue;
  });
}

cudaError_t launch_info_nce_fwd_grad(const InfoNceFwdGradParams& p, int max_smem, cudaStream_t stream) {
  return DTYPE_SWITCH(p.dtype, T, [&] {
    using K = RowBwdLayout<T, 1>;
    const dim3 grid(ceil_div(p.n, K::BM), ceil_div(p.d, K::Gemm2::DC));
    return launch_fused(info_nce_fwd_grad_kernel<T>, grid, K::kSmemBytes, max_smem, stream, p);
  });
}

int info_nce_bwd_block_rows(DType dtype) {
  return dtype == DType::kFloat64 ? RowBwdLayout<double, 1>::BM : RowBwdLayout<float, 1>::BM;
}

}  // namespace lsr
