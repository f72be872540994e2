// Device building blocks shared by every kernel family (info_nce, exp_gram, itc).
//
// Every fused kernel here has the same skeleton: a thread block owns BM rows of a left operand A
// and walks over column tiles of a right operand B (BN rows of B at a time).
//
//   TileGemm  S[BM][BN] = A[r0:r0+BM, :] . B[c0:c0+BN, :]^T over the full width D, written to shared
//             memory in the accumulation type. Forward kernels reduce S with an online log-sum-exp;
//             backward kernels turn it into the gradient weights H.
//   RowGemm   acc[BM][DC] += H[BM][BN] . B[c0:c0+BN, d0:d0+DC], kept in registers across all column
//             tiles; the block owns the D-columns [d0, d0 + DC) of its rows' gradient (grid.y splits D).
//
// Two implementations of each, picked by the element type:
//   fp16 / bf16: tensor cores through mma.sync m16n8k16 (fp32 accumulation) with operands read by
//                ldmatrix from shared memory, staged by a cp.async pipeline of 2-3 D-slices (sm_80+).
//                The accumulator fragments have the PTX ISA's documented lane layout, so rescaling
//                and storing them happens in registers.
//   fp32 / fp64: plain FMA register tiling (16 x 16 threads, each a TM x TN micro-tile), so fp32
//                results match a float32 reference tightly and fp64 supports gradcheck.
//
// Masking: rows past the valid count and columns past D are loaded as zeros, so S and the products
// in RowGemm are exact zeros there; callers mask what they reduce or store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef LSR_CPU_EMULATION
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

// The kernels compile unchanged into a CPU emulation (csrc/cpu_emulation/, used by the tests on
// machines without a GPU); these macros, prepare_launch and the cp.async, ldmatrix and mma.sync
// helpers are the only places where the two builds differ.
#ifdef LSR_CPU_EMULATION
#define LSR_DYNAMIC_SMEM(name) unsigned char* name = ::lsr_emu::block_shared_memory()
#define LSR_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::lsr_emu::launch(kernel, dim3(grid), dim3(block), smem_bytes, __VA_ARGS__)
#define LSR_LAST_ERROR() cudaSuccess
#else
#define LSR_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define LSR_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
#define LSR_LAST_ERROR() cudaGetLastError()
#endif

namespace lsr {

constexpr int kThreads = 256;  // every fused kernel runs 8 warps per block
constexpr int kWarps = kThreads / 32;
// __launch_bounds__ minimum blocks per SM for the kernels whose shared memory lets two blocks share
// a Hopper SM (<= 113 of its 227 KiB each): caps them at 128 registers (ptxas reports none or
// < 256 bytes of spills) for 16 resident warps instead of 8. Ampere's 164 KiB cannot hold two of
// the forward blocks, so there the cap would only cost spills. The ITC kernels need more registers.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
constexpr int kTwoBlocksPerSM = 2;
#else
constexpr int kTwoBlocksPerSM = 1;
#endif

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
// cp.async and bf16 mma.sync need sm_80; the host refuses fp16/bf16 on older devices and the fp32/fp64
// paths never touch these instructions.
#define LSR_NO_SM80 1
#endif

__host__ __device__ constexpr size_t align_up(size_t x, size_t a = 128) { return (x + a - 1) / a * a; }
__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Opts a kernel into `smem_bytes` of dynamic shared memory, or refuses when the device cannot.
template <class Kernel>
inline cudaError_t prepare_launch(Kernel kernel, size_t smem_bytes, int max_smem) {
  if (smem_bytes > static_cast<size_t>(max_smem)) return cudaErrorInvalidConfiguration;
#ifdef LSR_CPU_EMULATION
  (void)kernel;
  return cudaSuccess;
#else
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  // Reported by the caller (check_launch); cleared here so that the next C10_CUDA_KERNEL_LAUNCH_CHECK
  // (cudaGetLastError) of an unrelated PyTorch kernel does not fail with it.
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
#endif
}

// A fused kernel's launch: opt into its dynamic shared memory, run kThreads per block, report.
template <class Kernel, class Params>
inline cudaError_t launch_fused(Kernel kernel, dim3 grid, size_t smem_bytes, int max_smem, cudaStream_t stream,
                                const Params& p) {
  const cudaError_t err = prepare_launch(kernel, smem_bytes, max_smem);
  if (err != cudaSuccess) return err;
  (void)stream;  // unused by the CPU emulation's launch
  LSR_LAUNCH(kernel, grid, kThreads, smem_bytes, stream, p);
  return LSR_LAST_ERROR();
}

// ------------------------------------------------------------------------------ element types
template <typename T>
struct Types;
template <>
struct Types<float> {
  using acc_t = float;
  static constexpr bool kTensorCore = false;
};
template <>
struct Types<double> {
  using acc_t = double;
  static constexpr bool kTensorCore = false;
};
template <>
struct Types<__half> {
  using acc_t = float;
  static constexpr bool kTensorCore = true;
};
template <>
struct Types<__nv_bfloat16> {
  using acc_t = float;
  static constexpr bool kTensorCore = true;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  __device__ __forceinline__ static float from(float x) { return x; }
  __device__ __forceinline__ static float zero() { return 0.f; }
};
template <>
struct Convert<double> {
  __device__ __forceinline__ static double from(double x) { return x; }
  __device__ __forceinline__ static double zero() { return 0.0; }
};
template <>
struct Convert<__half> {
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static __half zero() { return __float2half_rn(0.f); }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static __nv_bfloat16 zero() { return __float2bfloat16_rn(0.f); }
};

// The tensor-core paths use the fast exponential (relative error ~1e-6, far below the fp16/bf16
// operand rounding); the fp32 path keeps the accurate one so fp32 parity stays tight.
template <bool FAST>
__device__ __forceinline__ float exp_acc(float x) {
  return FAST ? __expf(x) : expf(x);
}
template <bool FAST>
__device__ __forceinline__ double exp_acc(double x) {
  return exp(x);
}
// A logit s * S rounded on its own: nvcc would fuse `s * S - m` into one FMA, so the max logit minus
// the max (taken over rounded products) would not be exactly 0, nor a lone positive's loss.
template <typename V>
__device__ __forceinline__ V mul_rn(V a, V b) {
#ifdef LSR_CPU_EMULATION
  return a * b;
#else
  if constexpr (std::is_same<V, double>::value) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#endif
}
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename V>
__device__ __forceinline__ V max_acc(V a, V b) {
  return a > b ? a : b;
}

// Reductions over aligned groups of WIDTH lanes (WIDTH a power of two <= 32); every lane of the
// warp must call them (full-mask shuffles) and every lane of a group gets the result.
template <int WIDTH, typename V>
__device__ __forceinline__ V group_max(V v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset >>= 1) v = max_acc(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
template <int WIDTH, typename V>
__device__ __forceinline__ V group_sum(V v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Maximum over the block, returned to every thread. Every thread must call it (it synchronises
// twice); `scratch` holds kWarps values in shared memory.
template <typename V>
__device__ __forceinline__ V block_max(V v, V* scratch) {
  v = group_max<32>(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  V m = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = max_acc(m, scratch[w]);
  __syncthreads();  // scratch is free again
  return m;
}

// Sum over the block, valid in thread 0. Every thread must call it (it synchronises);
// `scratch` holds kWarps values in shared memory.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
  v = group_sum<32>(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V total = V(0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch[w];  // fixed order: deterministic
  }
  return total;
}

// ------------------------------------------------------------------------------------ cp.async
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(LSR_CPU_EMULATION)
  ::lsr_emu::cp_async_16(smem_dst, gmem_src, valid);
#elif !defined(LSR_NO_SM80)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
#else
  *reinterpret_cast<uint4*>(smem_dst) = valid ? *reinterpret_cast<const uint4*>(gmem_src) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(LSR_CPU_EMULATION)
  ::lsr_emu::cp_async_commit();
#elif !defined(LSR_NO_SM80)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(LSR_CPU_EMULATION)
  ::lsr_emu::cp_async_wait(N);
#elif !defined(LSR_NO_SM80)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ------------------------------------------------------------------------ ldmatrix / mma.sync
// Four 8 x 8 matrices of 16-bit elements from shared memory; lane l gives the address of row l % 8
// of matrix l / 8. Without TRANS, lane l gets in r[i] the elements (l / 4, 2 (l % 4) + {0, 1}) of
// matrix i; with TRANS those of its transpose, (2 (l % 4) + {0, 1}, l / 4).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(LSR_CPU_EMULATION)
  ::lsr_emu::ldmatrix_x4(r, smem_row, TRANS);
#elif !defined(LSR_NO_SM80)
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#else
  __trap();
#endif
}

// d[4] += A (16 x 16, row-major fragment a) . B (16 x 8, column-major fragment b) in fp32. For lane
// l, g = l / 4, t = l % 4: d = D(g, 2t), D(g, 2t + 1), D(g + 8, 2t), D(g + 8, 2t + 1); a[0..3] =
// A(g, 2t..), A(g + 8, 2t..), A(g, 2t + 8..), A(g + 8, 2t + 8..); b[0..1] = B(2t.., g), B(2t + 8.., g).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(LSR_CPU_EMULATION)
  const uint32_t b[2] = {b0, b1};
  ::lsr_emu::mma_m16n8k16<T>(d, a, b);
#elif !defined(LSR_NO_SM80)
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same<T, __half>::value, "mma.sync operands are fp16 or bf16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

// Where lane `lane` points ldmatrix_x4 inside a 16 x 16 block of a row-major shared-memory tile:
//   FragA: the block is A (rows m, columns k); r[0..3] become an mma `a` fragment.
//   FragBt: the block is B^T (rows n, columns k); r[0..1] / r[2..3] are the `b` fragments of columns
//           n 0-7 / 8-15.
//   FragBTrans (with TRANS): the block is B (rows k, columns n); r[0..1] / r[2..3] as FragBt.
struct FragA {
  __device__ static int row(int lane) { return lane & 15; }
  __device__ static int col(int lane) { return (lane >> 4) * 8; }
};
struct FragBt {
  __device__ static int row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
  __device__ static int col(int lane) { return ((lane >> 3) & 1) * 8; }
};
struct FragBTrans {
  __device__ static int row(int lane) { return (lane & 7) + (((lane >> 3) & 1) << 3); }
  __device__ static int col(int lane) { return (lane >> 4) * 8; }
};
// Where element e (0-3) of lane `lane`'s accumulator d sits in its 16 x 8 tile.
struct FragC {
  __device__ static int row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
  __device__ static int col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }
};

// Copies src[0:ROWS, col0:col0+COLS] of a row-major matrix with D columns into dst[ROWS][LDD]
// (shared memory); rows >= rows_valid and columns >= D become zeros. `vec` (2-byte types only):
// 16-byte cp.async, legal when D % 8 == 0, col0 % 8 == 0 and src is 16-byte aligned; it then moves
// whole 8-element vectors that are either entirely inside or entirely outside [0, D).
template <typename T, int ROWS, int COLS, int LDD>
__device__ __forceinline__ void load_block(T* dst, const T* src, int rows_valid, int col0, int D, bool vec) {
  if constexpr (sizeof(T) == 2) {
    if (vec) {
      constexpr int kVec = 8;
      constexpr int kVecPerRow = COLS / kVec;
      static_assert(COLS % kVec == 0 && (LDD * sizeof(T)) % 16 == 0, "16-byte rows");
      // Not unrolled: unrolled, the compiler hoists every iteration's addresses out of the kernels'
      // column-tile loops and holds them there, and at the 128-register cap those spill (sm_90 ptxas:
      // 60-204 bytes per thread in the info_nce backward, rolled 0-28).
#pragma unroll 1
      for (int v = threadIdx.x; v < ROWS * kVecPerRow; v += kThreads) {
        const int r = v / kVecPerRow;
        const int cc = (v % kVecPerRow) * kVec;
        const bool ok = r < rows_valid && col0 + cc < D;
        const T* g = ok ? src + static_cast<int64_t>(r) * D + col0 + cc : src;
        cp_async_16(dst + r * LDD + cc, g, ok);
      }
      return;
    }
  }
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
    const int r = e / COLS;
    const int cc = e % COLS;
    const int col = col0 + cc;
    dst[r * LDD + cc] = (r < rows_valid && col < D) ? src[static_cast<int64_t>(r) * D + col] : Convert<T>::zero();
  }
}

// =================================================================================== TileGemm
// S[a][BM][lds] = A[a][0:BM, :] . B[0:BN, :]^T for a < NA operands A (sharing the loads of B).
// A[a] and B point at the first row of the block; a_rows / b_rows rows are valid.
// On return S is written (per warp) and other warps may still be reading the last D-slice: the
// caller synchronises before reading other warps' parts of S, and before the next run.
// Precondition: no thread still reads this GEMM's shared buffers or S (the caller synchronised).

// ----------------------------------------------------------------- tensor cores (fp16 / bf16)
// STAGES D-slices in flight (cp.async ring buffer): the next STAGES - 1 slices load while one is
// multiplied, which hides an L2 round trip when a slice is little work (the 64 x 64 backward tiles).
template <typename T, int BM, int BN, int NA, int STAGES>
struct TcTileGemm {
  static constexpr int BK = 32;       // D-slice per pipeline stage
  static constexpr int LDK = BK + 8;  // 80-byte rows: 16-byte aligned cp.async and ldmatrix rows, and
                                      // the 8 rows one ldmatrix phase reads fall on 8 distinct bank quads
  static constexpr int WARPS_M = 4, WARPS_N = 2;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int FM = WM / 16, FN = WN / 16;  // 16 x 16 blocks per warp; FN pairs of n8 mma tiles
  static_assert(WARPS_M * WARPS_N == kWarps, "8 warps");
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile is a multiple of 16 x 16");
  static_assert(STAGES >= 2, "a slice loads while another is multiplied");
  static constexpr int kStageA = BM * LDK, kStageB = BN * LDK;  // elements
  static constexpr size_t kSmemBytes = sizeof(T) * STAGES * (NA * kStageA + kStageB);

  template <typename acc_t>
  __device__ static void run(const T* const* A, int a_rows, const T* B, int b_rows, int D, bool vec, T* smem,
                             acc_t* const* S, int lds) {
    static_assert(std::is_same<acc_t, float>::value, "tensor cores accumulate in fp32");
    auto stage_a = [&](int a, int st) { return smem + (a * STAGES + st) * kStageA; };
    auto stage_b = [&](int st) { return smem + STAGES * NA * kStageA + st * kStageB; };
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;

    float acc[NA][FM][2 * FN][4];
#pragma unroll
    for (int a = 0; a < NA; ++a)
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < 2 * FN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][i][j][e] = 0.0f;

    auto load_stage = [&](int st, int kc) {
#pragma unroll
      for (int a = 0; a < NA; ++a) load_block<T, BM, BK, LDK>(stage_a(a, st), A[a], a_rows, kc * BK, D, vec);
      load_block<T, BN, BK, LDK>(stage_b(st), B, b_rows, kc * BK, D, vec);
    };
    // This lane's ldmatrix rows within the warp's tile of each stage.
    const int a_off = (wm * WM + FragA::row(lane)) * LDK + FragA::col(lane);
    const int b_off = (wn * WN + FragBt::row(lane)) * LDK + FragBt::col(lane);

    const int nk = ceil_div(D, BK);
    // One commit group per slice, empty past the last, so "all but the newest STAGES - 2 groups"
    // always includes slice kc (and any group the caller committed before, e.g. RowGemm's prefetch).
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < nk) load_stage(st, st);
      cp_async_commit();
    }
    for (int kc = 0; kc < nk; ++kc) {
      cp_async_wait<STAGES - 2>();
      // Slice kc has landed for every thread, and every thread is done with slice kc - 1, whose
      // stage the load below refills.
      __syncthreads();
      if (kc + STAGES - 1 < nk) load_stage((kc + STAGES - 1) % STAGES, kc + STAGES - 1);
      cp_async_commit();
      const int st = kc % STAGES;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        uint32_t bf[FN][4];  // B^T's rows n are the stage's rows: columns n of the product
#pragma unroll
        for (int j = 0; j < FN; ++j) ldmatrix_x4<false>(bf[j], stage_b(st) + b_off + 16 * j * LDK + kk);
#pragma unroll
        for (int a = 0; a < NA; ++a) {
#pragma unroll
          for (int i = 0; i < FM; ++i) {
            uint32_t af[4];
            ldmatrix_x4<false>(af, stage_a(a, st) + a_off + 16 * i * LDK + kk);
#pragma unroll
            for (int j = 0; j < FN; ++j) {
              mma_16816<T>(acc[a][i][2 * j], af, bf[j][0], bf[j][1]);
              mma_16816<T>(acc[a][i][2 * j + 1], af, bf[j][2], bf[j][3]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int a = 0; a < NA; ++a)
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < 2 * FN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            S[a][(wm * WM + 16 * i + FragC::row(lane, e)) * lds + wn * WN + 8 * j + FragC::col(lane, e)] =
                acc[a][i][j][e];
  }
};

// ------------------------------------------------------------------------- FMA (fp32 / fp64)
template <typename T, int BM, int BN, int NA>  // synchronous loads: no pipeline stages
struct FmaTileGemm {
  static constexpr int BK = 16;
  static constexpr int LDK = BK + 1;  // odd stride: the 16 rows a half-warp reads hit 16 banks
  static constexpr int TM = BM / 16, TN = BN / 16;  // thread (ty, tx) owns rows ty + 16 i, cols tx + 16 j
  static_assert(BM % 16 == 0 && BN % 16 == 0, "16 x 16 thread grid");
  static constexpr size_t kSmemBytes = sizeof(T) * (NA * BM + BN) * LDK;

  template <typename acc_t>
  __device__ static void run(const T* const* A, int a_rows, const T* B, int b_rows, int D, bool /*vec*/, T* smem,
                             acc_t* const* S, int lds) {
    static_assert(std::is_same<acc_t, T>::value, "fp32 / fp64 accumulate in their own type");
    T* sB = smem + NA * BM * LDK;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    acc_t acc[NA][TM][TN];
#pragma unroll
    for (int a = 0; a < NA; ++a)
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[a][i][j] = acc_t(0);

    for (int k0 = 0; k0 < D; k0 += BK) {
#pragma unroll
      for (int a = 0; a < NA; ++a) load_block<T, BM, BK, LDK>(smem + a * BM * LDK, A[a], a_rows, k0, D, false);
      load_block<T, BN, BK, LDK>(sB, B, b_rows, k0, D, false);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        acc_t bv[TN];
#pragma unroll
        for (int j = 0; j < TN; ++j) bv[j] = sB[(tx + 16 * j) * LDK + kk];
#pragma unroll
        for (int a = 0; a < NA; ++a) {
#pragma unroll
          for (int i = 0; i < TM; ++i) {
            const acc_t av = smem[a * BM * LDK + (ty + 16 * i) * LDK + kk];
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[a][i][j] = fma(av, bv[j], acc[a][i][j]);
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < NA; ++a)
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) S[a][(ty + 16 * i) * lds + tx + 16 * j] = acc[a][i][j];
  }
};

template <typename T, int BM, int BN, int NA, int STAGES = 2>
using TileGemm = typename std::conditional<Types<T>::kTensorCore, TcTileGemm<T, BM, BN, NA, STAGES>,
                                           FmaTileGemm<T, BM, BN, NA>>::type;

// ==================================================================================== RowGemm
// acc[BM][DC] (registers) += H[BM][BN] . B2[BN][DC] over the column tiles, with
//   sH  [BM][LDH]: the gradient weights of the current tile, written by the caller (element type T);
//   sB2 [BN][LDB2]: B[c0:c0+BN, d0:d0+DC], loaded by prefetch() (async on the tensor-core path).
// Protocol per column tile: prefetch(); ... write sH ...; accumulate(); __syncthreads().
// scale_rows() rescales the accumulated rows (an online softmax whose reference max moved); every
// thread calls it, between tiles. store() hands each valid (row, col, value) to a functor once,
// after the last tile.

// ----------------------------------------------------------------- tensor cores (fp16 / bf16)
template <typename T, int BM, int BN, int F>
struct TcRowGemm {
  using acc_t = float;
  static constexpr int DC = kWarps * 16 * F;  // warp w owns columns [16 F w, 16 F (w + 1)) of the chunk
  static constexpr int LDB2 = DC + 8;         // 16-byte aligned rows; ldmatrix's 8 rows on 8 bank quads
  static constexpr int LDH = BN + 8;
  static constexpr int FM = BM / 16;
  static_assert(BM % 16 == 0 && BN % 16 == 0, "16 x 16 fragments");
  static constexpr size_t kSmemBytes = sizeof(T) * (BN * LDB2 + BM * LDH);

  float acc[FM][2 * F][4];  // 16 x 8 tiles at rows 16 i, columns 8 j of the warp's (FragC inside each)
  T* sB2;
  T* sH;

  __device__ void init(T* smem) {
    sB2 = smem;
    sH = smem + BN * LDB2;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < 2 * F; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  }

  __device__ void prefetch(const T* B, int b_rows, int d0, int D, bool vec) {
    load_block<T, BN, DC, LDB2>(sB2, B, b_rows, d0, D, vec);
    cp_async_commit();
  }

  __device__ void accumulate(int d0, int D) {
    cp_async_wait<0>();
    __syncthreads();  // sB2 landed and sH is complete
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = warp * 16 * F;
    if (d0 + n0 >= D) return;  // this warp's columns are all padding (warp-uniform)
    const T* b_base = sB2 + FragBTrans::row(lane) * LDB2 + n0 + FragBTrans::col(lane);
    const T* h_base = sH + FragA::row(lane) * LDH + FragA::col(lane);
#pragma unroll
    for (int kk = 0; kk < BN; kk += 16) {
      uint32_t bf[F][4];  // B2 as stored: rows k, columns n
#pragma unroll
      for (int j = 0; j < F; ++j) ldmatrix_x4<true>(bf[j], b_base + kk * LDB2 + 16 * j);
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        uint32_t af[4];
        ldmatrix_x4<false>(af, h_base + 16 * i * LDH + kk);
#pragma unroll
        for (int j = 0; j < F; ++j) {
          mma_16816<T>(acc[i][2 * j], af, bf[j][0], bf[j][1]);
          mma_16816<T>(acc[i][2 * j + 1], af, bf[j][2], bf[j][3]);
        }
      }
    }
  }

  // acc[r][:] *= factors[r] for the BM rows (factors in shared memory).
  __device__ void scale_rows(const float* factors) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < 2 * F; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] *= factors[16 * i + FragC::row(lane, e)];
  }

  template <class Out>
  __device__ void store(int a_rows, int d0, int D, Out out) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = d0 + warp * 16 * F;
    if (n0 >= D) return;  // warp-uniform: these columns are padding
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < 2 * F; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = 16 * i + FragC::row(lane, e), col = n0 + 8 * j + FragC::col(lane, e);
          if (row < a_rows && col < D) out(row, col, acc[i][j][e]);
        }
  }
};

// ------------------------------------------------------------------------- FMA (fp32 / fp64)
template <typename T, int BM, int BN, int DC_>
struct FmaRowGemm {
  using acc_t = T;
  static constexpr int DC = DC_;
  static constexpr int LDB2 = DC;      // read along rows by consecutive threads: no padding needed
  static constexpr int LDH = BN + 4;   // matches the epilogue's (row, part + TPR k) write pattern
  static constexpr int TM = BM / 16, TN = DC / 16;
  static_assert(BM % 16 == 0 && DC % 16 == 0, "16 x 16 thread grid");
  static constexpr size_t kSmemBytes = sizeof(T) * (BN * LDB2 + BM * LDH);

  acc_t acc[TM][TN];
  T* sB2;
  T* sH;

  __device__ void init(T* smem) {
    sB2 = smem;
    sH = smem + BN * LDB2;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);
  }

  __device__ void prefetch(const T* B, int b_rows, int d0, int D, bool /*vec*/) {
    load_block<T, BN, DC, LDB2>(sB2, B, b_rows, d0, D, false);
  }

  __device__ void accumulate(int /*d0*/, int /*D*/) {
    __syncthreads();  // sB2 and sH are complete
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
    for (int k = 0; k < BN; ++k) {
      acc_t bv[TN];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = sB2[k * LDB2 + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const acc_t h = sH[(ty + 16 * i) * LDH + k];
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(h, bv[j], acc[i][j]);
      }
    }
  }

  // acc[r][:] *= factors[r]: each thread owns its rows' accumulators.
  __device__ void scale_rows(const acc_t* factors) {
    const int ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const acc_t f = factors[ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] *= f;
    }
  }

  template <class Out>
  __device__ void store(int a_rows, int d0, int D, Out out) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int row = ty + 16 * i, col = d0 + tx + 16 * j;
        if (row < a_rows && col < D) out(row, col, acc[i][j]);
      }
  }
};

// The tensor-core RowGemm owns 256 D-columns per block (64 rows x 256 fp32 accumulators = 64
// registers per thread); the FMA one 128 (32 per thread in fp32).
template <typename T, int BM, int BN>
using RowGemm = typename std::conditional<Types<T>::kTensorCore, TcRowGemm<T, BM, BN, 2>,
                                          FmaRowGemm<T, BM, BN, 128>>::type;

// Shared-memory layout and epilogue mapping of the backward kernels ("gradient of the left operand"):
// a block owns BM rows of A (NA left operands share each B tile) and D-columns [d0, d0 + DC).
//   [TileGemm buffers | S: NA x BM x LDS acc | RowGemm buffers (sB2, sH) | rows: BM acc | scratch]
// Epilogue: kTPR threads per row; thread `part` takes the tile columns part, part + kTPR, ... With a
// row stride of 4 (mod 32) words the 8 rows x 4 parts of a warp read 32 distinct banks.
template <typename T, int NA>
struct RowBwdLayout {
  using acc_t = typename Types<T>::acc_t;
  static constexpr int BM = std::is_same<T, double>::value ? 32 : 64;
  static constexpr int BN = BM;
  static constexpr int kTPR = kThreads / BM;
  static constexpr int LDS = BN + 4;
  // Three slices in flight: a 64 x 64 x 32 slice is 8 mma.sync per warp, too little to cover an L2
  // round trip with one slice loading; the forward's 128 x 128 slices do 4x more and keep two.
  using Gemm1 = TileGemm<T, BM, BN, NA, 3>;
  using Gemm2 = RowGemm<T, BM, BN>;
  static constexpr size_t kOffS = align_up(Gemm1::kSmemBytes);
  static constexpr size_t kOffG2 = align_up(kOffS + sizeof(acc_t) * NA * BM * LDS);
  static constexpr size_t kOffRows = align_up(kOffG2 + Gemm2::kSmemBytes);
  static constexpr size_t kOffScratch = align_up(kOffRows + sizeof(acc_t) * BM);
  static constexpr size_t kSmemBytes = kOffScratch + sizeof(acc_t) * kWarps;
  static_assert(BN % kTPR == 0 && kTPR <= 32, "whole columns per thread, a row's threads in one warp");
};

// Scale applied to the gradient weights H before they are rounded to the tensor-core operand
// type: |H| <= 2, and fp16 would flush the typical entries (~1/N) to subnormals. A power of two,
// so it is exact; 2 * 8192 stays far below fp16's 65504.
template <typename T>
struct HScale {
  static constexpr float value = Types<T>::kTensorCore ? 8192.0f : 1.0f;
};

}  // namespace lsr
