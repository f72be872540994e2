// Probes of the CPU emulation itself, not of the kernels:
// - fragment_probe: one warp through tile_gemm.cuh's ldmatrix_x4 and mma_16816, returning every lane's
//   registers, so that a test can hold the emulation to the PTX ISA's fragment tables directly
//   (tests/test_cuda.py::test_emulated_fragments_follow_the_ptx_isa) and not only through the kernels,
//   which are written to the same tables.
// - barrier_probe: one thread writes shared memory and a thread of another warp reads it, with or
//   without a __syncthreads between them; bounds_probe: one thread reads element `index` of a global
//   buffer and another element `index` of the block's shared memory. The sanitizers' controls
//   (scripts/cuda_emu_sanitize.py): racecheck must report the race without the barrier and nothing
//   with it; memcheck must report an index one past the end and nothing at the last element.
#include "cuda_emu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../tile_gemm.cuh"

namespace {

struct ProbeParams {
  const uint16_t* matrices;  // four 8 x 8 matrices of 16-bit elements, row-major
  const uint32_t* a;         // [32][4] mma `a` registers per lane
  const uint32_t* b;         // [32][2] mma `b` registers per lane
  uint32_t* loaded;          // [32][4] ldmatrix_x4 registers per lane
  uint32_t* loaded_trans;    // [32][4] ldmatrix_x4.trans registers per lane
  float* d;                  // [32][4] mma_16816 accumulators per lane (from zero)
};

void probe_kernel(const ProbeParams p) {
  LSR_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x;
  auto* rows = reinterpret_cast<uint16_t*>(smem);
  for (int e = 8 * lane; e < 8 * lane + 8; ++e) rows[e] = p.matrices[e];
  __syncwarp();
  // Lane l gives row l % 8 of matrix l / 8: 16 bytes at 16 l.
  uint32_t r[4];
  lsr::ldmatrix_x4<false>(r, smem + 16 * lane);
  for (int i = 0; i < 4; ++i) p.loaded[4 * lane + i] = r[i];
  lsr::ldmatrix_x4<true>(r, smem + 16 * lane);
  for (int i = 0; i < 4; ++i) p.loaded_trans[4 * lane + i] = r[i];
  const uint32_t a[4] = {p.a[4 * lane], p.a[4 * lane + 1], p.a[4 * lane + 2], p.a[4 * lane + 3]};
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  lsr::mma_16816<__nv_bfloat16>(d, a, p.b[2 * lane], p.b[2 * lane + 1]);
  for (int i = 0; i < 4; ++i) p.d[4 * lane + i] = d[i];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fragment_probe(const at::Tensor& matrices, const at::Tensor& a,
                                                              const at::Tensor& b) {
  TORCH_CHECK(matrices.scalar_type() == at::kShort && matrices.numel() == 256 && matrices.is_contiguous(),
              "fragment_probe: matrices must be 256 contiguous int16, got ", matrices.scalar_type(), " ",
              matrices.sizes());
  TORCH_CHECK(a.scalar_type() == at::kInt && a.sizes() == at::IntArrayRef({32, 4}) && a.is_contiguous(),
              "fragment_probe: a must be contiguous int32 [32, 4], got ", a.sizes());
  TORCH_CHECK(b.scalar_type() == at::kInt && b.sizes() == at::IntArrayRef({32, 2}) && b.is_contiguous(),
              "fragment_probe: b must be contiguous int32 [32, 2], got ", b.sizes());
  auto loaded = at::empty({32, 4}, a.options());
  auto loaded_trans = at::empty({32, 4}, a.options());
  auto d = at::empty({32, 4}, a.options().dtype(at::kFloat));
  const ProbeParams p{reinterpret_cast<const uint16_t*>(matrices.data_ptr<int16_t>()),
                      reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>()),
                      reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>()),
                      reinterpret_cast<uint32_t*>(loaded.data_ptr<int32_t>()),
                      reinterpret_cast<uint32_t*>(loaded_trans.data_ptr<int32_t>()), d.data_ptr<float>()};
  ::lsr_emu::launch(probe_kernel, dim3(1), dim3(32), 512, p);
  return {loaded, loaded_trans, d};
}

struct BarrierProbeParams {
  const float* value;  // [1]: what thread 0 writes
  bool with_barrier;
  float* out;          // [1]: what thread 32 read
};

void barrier_probe_kernel(const BarrierProbeParams p) {
  LSR_DYNAMIC_SMEM(smem);
  auto* word = reinterpret_cast<float*>(smem);
  if (threadIdx.x == 0) *word = *p.value;
  if (p.with_barrier) __syncthreads();
  if (threadIdx.x == 32) *p.out = *word;
}

at::Tensor barrier_probe(const at::Tensor& value, bool with_barrier) {
  TORCH_CHECK(value.scalar_type() == at::kFloat && value.numel() == 1 && value.is_contiguous(),
              "barrier_probe: value must be one contiguous float32, got ", value.scalar_type(), " ", value.sizes());
  auto out = at::zeros({1}, value.options());
  ::lsr_emu::launch(barrier_probe_kernel, dim3(1), dim3(64), 16,
                    BarrierProbeParams{value.data_ptr<float>(), with_barrier, out.data_ptr<float>()});
  return out;
}

struct BoundsProbeParams {
  const float* values;
  int n, index;
  float* out;  // [2]: values[index], then shared[index] of an n-float shared buffer
};

void bounds_probe_kernel(const BoundsProbeParams p) {
  LSR_DYNAMIC_SMEM(smem);
  auto* shared = reinterpret_cast<float*>(smem);
  for (int i = threadIdx.x; i < p.n; i += blockDim.x) shared[i] = p.values[i];
  __syncthreads();
  if (threadIdx.x == 0) p.out[0] = p.values[p.index];
  if (threadIdx.x == 1) p.out[1] = shared[p.index];
}

at::Tensor bounds_probe(const at::Tensor& values, int64_t index) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.dim() == 1 && values.numel() > 0 && values.is_contiguous(),
              "bounds_probe: values must be a non-empty contiguous float32 vector, got ", values.scalar_type(), " ",
              values.sizes());
  auto out = at::zeros({2}, values.options());
  const int n = static_cast<int>(values.numel());
  ::lsr_emu::launch(bounds_probe_kernel, dim3(1), dim3(32), sizeof(float) * n,
                    BoundsProbeParams{values.data_ptr<float>(), n, static_cast<int>(index), out.data_ptr<float>()});
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lsr_kernels_emu, m) {
  m.def("fragment_probe(Tensor matrices, Tensor a, Tensor b) -> (Tensor, Tensor, Tensor)");
  m.def("barrier_probe(Tensor value, bool with_barrier) -> Tensor");
  m.def("bounds_probe(Tensor values, int index) -> Tensor");
}
TORCH_LIBRARY_IMPL(lsr_kernels_emu, CPU, m) {
  m.impl("fragment_probe", &fragment_probe);
  m.impl("barrier_probe", &barrier_probe);
  m.impl("bounds_probe", &bounds_probe);
}
