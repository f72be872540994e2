// One warp through tile_gemm.cuh's ldmatrix_x4 and mma_16816 on the CPU emulation, returning every
// lane's registers, so that a test can hold the emulation to the PTX ISA's fragment tables directly
// (tests/test_cuda.py::test_emulated_fragments_follow_the_ptx_isa) and not only through the kernels,
// which are written to the same tables.
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(lsr_kernels_emu, m) {
  m.def("fragment_probe(Tensor matrices, Tensor a, Tensor b) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lsr_kernels_emu, CPU, m) { m.impl("fragment_probe", &fragment_probe); }
