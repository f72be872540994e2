// A CPU emulation of the small part of CUDA that the kernels in csrc/ use, so that the kernels' own
// source (index arithmetic, masking, shared-memory layouts, synchronisation, the online reductions,
// the op wrappers) runs and is tested on machines without a GPU. A test harness, not a backend:
// it is slow and runs one block at a time. Built by lsr_kernels.backends.cuda.load_cpu_emulation().
//
// Model:
// - Blocks run one after another; the threads of a block are real std::threads, so __syncthreads,
//   __syncwarp and the shuffles are real barriers. A thread that misses a barrier the others wait on
//   (divergent synchronisation) aborts the process with a message instead of hanging.
// - Shared memory starts as 0xFF bytes (NaN in every float type), so reading shared memory that was
//   never written poisons the result; guard bytes around it catch writes past the requested size.
// - ldmatrix and mma.sync (m16n8k16) follow the PTX ISA's per-lane fragment layouts exactly: each
//   lane holds only its own registers, and the warp exchanges them through per-thread slots, so a
//   kernel that puts a value in the wrong lane or register gets a wrong result here as on a GPU.
//   ldmatrix checks that every row address is 16-byte aligned and inside the block's shared memory;
//   the products are exact and accumulate in fp32, as on tensor cores.
// - cp.async checks both addresses' alignment and, by default, copies (or zero-fills) its 16 bytes at
//   once: the earliest a GPU may land it, which exposes a copy into a buffer other threads still read.
//   With LSR_EMU_CP_ASYNC=deferred in the environment (read at each launch) it lands as late as the
//   PTX ISA allows: at the cp.async.wait_group that retires its group (or the kernel's end), which
//   exposes a read of data that no wait has yet made complete.
#pragma once

#ifndef LSR_CPU_EMULATION
#define LSR_CPU_EMULATION 1
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <array>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

// CUDA's host headers turn these into GNU attributes; here they are plain C++.
#undef __device__
#undef __global__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#undef __launch_bounds__
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

using std::exp;
using std::fma;
using std::log;
using std::sqrt;

inline int min(int a, int b) { return a < b ? a : b; }
inline float __expf(float x) { return std::exp(x); }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "lsr cpu emulation: __trap()\n");
  std::abort();
}

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace lsr_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "lsr cpu emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// A reusable barrier for `count` threads; waiting longer than the timeout means some thread of the
// group will never arrive (a divergent __syncthreads / __syncwarp / shuffle).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long long generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) fail(what);
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const int count_;
  int waiting_ = 0;
  unsigned long long generation_ = 0;
};

struct BlockState {
  explicit BlockState(int threads) : block(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new Barrier(32));
    shuffle.resize(threads);
    for (auto& bank : exchange) bank.resize(threads);
    exchanges.resize(threads);
    committed.resize(threads);
    open_group.resize(threads);
  }
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<unsigned long long> shuffle;  // one 8-byte slot per thread
  // ldmatrix / mma.sync: each lane publishes its row address or operand registers in a slot, the
  // warp meets at one barrier, and each lane reads the others' slots. Two banks, alternating per
  // exchange, so a lane may fill its next slot while slower lanes still read this one (it cannot
  // get two exchanges ahead: that needs the barrier of the next one, which they have not reached).
  struct Slot {
    const unsigned char* row;
    uint32_t regs[6];  // mma.sync operands: a[4], b[2]
  };
  std::array<std::vector<Slot>, 2> exchange;
  std::vector<unsigned> exchanges;  // per thread: warp exchanges so far (the bank's parity)
  // Deferred cp.async: per thread, its committed groups (oldest first) and the group being filled.
  struct Copy {
    void* dst;
    unsigned char bytes[16];
  };
  bool defer_copies = false;
  std::vector<std::deque<std::vector<Copy>>> committed;
  std::vector<std::vector<Copy>> open_group;
  int vote_or = 0;                          // __syncthreads_or's accumulator (guarded by `block`)
  std::mutex vote_mutex;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
};

inline thread_local BlockState* tl_block = nullptr;

inline unsigned char* block_shared_memory() { return tl_block->smem; }
inline unsigned thread_rank() { return threadIdx.x; }
// The bank of slots for this thread's next warp exchange (its own slot and the other lanes').
inline std::vector<BlockState::Slot>& next_exchange_bank() {
  return tl_block->exchange[tl_block->exchanges[thread_rank()]++ % 2];
}
inline Barrier& warp_barrier() { return *tl_block->warps[thread_rank() / 32]; }

inline std::mutex& atomic_mutex() {
  static std::mutex m;
  return m;
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) fail("cp.async: shared-memory destination not 16-byte aligned");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: global source not 16-byte aligned");
  BlockState::Copy copy{dst, {}};
  if (valid) std::memcpy(copy.bytes, src, 16);  // global inputs do not change during a launch
  if (tl_block->defer_copies) {
    tl_block->open_group[thread_rank()].push_back(copy);
  } else {
    std::memcpy(dst, copy.bytes, 16);
  }
}

inline void cp_async_commit() {
  const unsigned me = thread_rank();
  tl_block->committed[me].push_back(std::move(tl_block->open_group[me]));
  tl_block->open_group[me].clear();
}

// Lands this thread's committed groups but the newest `pending` (cp.async.wait_group pending).
inline void cp_async_wait(int pending) {
  auto& groups = tl_block->committed[thread_rank()];
  while (static_cast<int>(groups.size()) > pending) {
    for (const auto& copy : groups.front()) std::memcpy(copy.dst, copy.bytes, 16);
    groups.pop_front();
  }
}

// Guard bytes around a block's shared memory catch writes past it. Under AddressSanitizer
// (scripts/cuda_emu_sanitize.py --tool memcheck) there are none: the allocation is exactly the
// requested size, so ASan's redzones catch reads past it as well.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kGuardBytes = 0;
#else
constexpr size_t kGuardBytes = 1024;
#endif
constexpr size_t kSharedMemoryLimit = 166912;  // sm_80's opt-in limit per block, the strictest target

template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, dim3 block, size_t smem_bytes, const Params& params) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || threads % 32 != 0) fail("launch: blocks must be 1-D with whole warps");
  if (smem_bytes > kSharedMemoryLimit) fail("launch: more dynamic shared memory than sm_80 allows");
  const size_t total = smem_bytes + 2 * kGuardBytes;
  const char* mode = std::getenv("LSR_EMU_CP_ASYNC");
  const bool defer_copies = mode != nullptr && std::strcmp(mode, "deferred") == 0;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        void* raw = nullptr;
        if (posix_memalign(&raw, 128, total) != 0) fail("launch: cannot allocate the block's shared memory");
        std::unique_ptr<unsigned char, decltype(&std::free)> buffer(static_cast<unsigned char*>(raw), &std::free);
        std::memset(buffer.get(), 0xFF, total);
        BlockState state(threads);
        state.smem = buffer.get() + kGuardBytes;
        state.smem_bytes = smem_bytes;
        state.defer_copies = defer_copies;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = make_uint3(static_cast<unsigned>(t), 0, 0);
            blockIdx = make_uint3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            tl_block = &state;
            kernel(params);
            cp_async_commit();
            cp_async_wait(0);  // what a thread left in flight still lands (inside the guard check)
            tl_block = nullptr;
          });
        }
        for (auto& th : pool) th.join();
        for (size_t i = 0; i < kGuardBytes; ++i) {
          if (buffer.get()[i] != 0xFF || buffer.get()[kGuardBytes + smem_bytes + i] != 0xFF)
            fail("shared memory written outside the requested range");
        }
      }
    }
  }
}

}  // namespace lsr_emu

inline void __syncthreads() {
  lsr_emu::tl_block->block.arrive_and_wait("deadlock in __syncthreads (divergent barrier)");
}
// A barrier that also returns whether any thread passed a non-zero predicate.
inline int __syncthreads_or(int predicate) {
  auto& blk = *lsr_emu::tl_block;
  if (predicate) {
    std::lock_guard<std::mutex> lock(blk.vote_mutex);
    blk.vote_or = 1;
  }
  blk.block.arrive_and_wait("deadlock in __syncthreads_or (divergent barrier)");
  int result;
  {
    std::lock_guard<std::mutex> lock(blk.vote_mutex);
    result = blk.vote_or;
  }
  blk.block.arrive_and_wait("deadlock in __syncthreads_or (divergent barrier)");
  if (lsr_emu::thread_rank() == 0) blk.vote_or = 0;  // every thread has read it; reset for the next vote
  blk.block.arrive_and_wait("deadlock in __syncthreads_or (divergent barrier)");
  return result;
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  lsr_emu::warp_barrier().arrive_and_wait("deadlock in __syncwarp (divergent warp barrier)");
}

template <typename V>
V __shfl_xor_sync(unsigned, V value, int lane_mask) {
  static_assert(sizeof(V) <= 8 && std::is_trivially_copyable<V>::value, "8-byte shuffle slots");
  auto& slots = lsr_emu::tl_block->shuffle;
  const unsigned me = lsr_emu::thread_rank();
  const unsigned other = (me & ~31u) | ((me & 31u) ^ static_cast<unsigned>(lane_mask));
  std::memcpy(&slots[me], &value, sizeof(V));
  lsr_emu::warp_barrier().arrive_and_wait("deadlock in __shfl_xor_sync (not all 32 lanes)");
  V result;
  std::memcpy(&result, &slots[other], sizeof(V));
  lsr_emu::warp_barrier().arrive_and_wait("deadlock in __shfl_xor_sync (not all 32 lanes)");
  return result;
}

inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare, unsigned long long value) {
  std::lock_guard<std::mutex> lock(lsr_emu::atomic_mutex());
  const unsigned long long old = *address;
  if (old == compare) *address = value;
  return old;
}

// ------------------------------------------------------------------------------ ldmatrix / mma.sync
namespace lsr_emu {

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of matrix
// l / 8 (eight 16-bit elements). Of matrix i, lane l receives in r[i] the elements (l / 4, 2 (l % 4))
// and (l / 4, 2 (l % 4) + 1), the first in the low half; with .trans, those of the transposed
// matrix: (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
inline void ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
  BlockState& blk = *tl_block;
  const auto* p = static_cast<const unsigned char*>(row);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
  if (p < blk.smem || p + 16 > blk.smem + blk.smem_bytes) fail("ldmatrix: row outside the block's shared memory");
  const unsigned me = thread_rank(), lane = me & 31u, base = me & ~31u;
  auto& slots = next_exchange_bank();
  slots[me].row = p;
  warp_barrier().arrive_and_wait("deadlock in ldmatrix (not all 32 lanes)");
  auto element = [&](unsigned matrix, unsigned r8, unsigned c8) {
    uint16_t v;
    std::memcpy(&v, slots[base + 8 * matrix + r8].row + 2 * c8, 2);
    return static_cast<uint32_t>(v);
  };
  const unsigned g = lane / 4, t = lane % 4;
  for (unsigned i = 0; i < 4; ++i) {
    r[i] = trans ? element(i, 2 * t, g) | (element(i, 2 * t + 1, g) << 16)
                 : element(i, g, 2 * t) | (element(i, g, 2 * t + 1) << 16);
  }
}

inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
inline float half_to_float(uint32_t reg, unsigned half) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  T v;
  std::memcpy(&v, &bits, 2);
  return to_float(v);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += A[16 x 16] B[16 x 8] with, for lane l,
// g = l / 4 and t = l % 4: a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..),
// a[3] = A(g+8, 2t+8..); b[0] = B(2t..2t+1, g), b[1] = B(2t+8.., g); d = D(g, 2t), D(g, 2t+1),
// D(g+8, 2t), D(g+8, 2t+1).
template <typename T>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  const unsigned me = thread_rank(), lane = me & 31u, base = me & ~31u;
  auto& slots = next_exchange_bank();
  uint32_t* mine = slots[me].regs;
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  warp_barrier().arrive_and_wait("deadlock in mma.sync (not all 32 lanes)");
  auto A = [&](unsigned row, unsigned k) {
    return half_to_float<T>(slots[base + 4 * (row % 8) + (k % 8) / 2].regs[(row / 8) + 2 * (k / 8)], k % 2);
  };
  auto B = [&](unsigned k, unsigned col) {
    return half_to_float<T>(slots[base + 4 * col + (k % 8) / 2].regs[4 + k / 8], k % 2);
  };
  const unsigned g = lane / 4, t = lane % 4;
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float acc = d[e];
    for (unsigned k = 0; k < 16; ++k) acc = std::fma(A(row, k), B(k, col), acc);
    d[e] = acc;
  }
}

}  // namespace lsr_emu
