// lsr_kernels::exp_gram_fwd / exp_gram_bwd: schema, argument checks and dispatch (kernels in
// exp_gram_kernels.cu). sum_{j,k} exp(-t ||x_j - x_k||^2), the uniformity reduction of SPEC 2.2.
#include <algorithm>
#include <cmath>

#include "checks.h"

namespace lsr {
namespace {

constexpr const char* kFwd = "lsr_kernels::exp_gram_fwd";
constexpr const char* kBwd = "lsr_kernels::exp_gram_bwd";

void check_t(double t, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(t) && t > 0.0, op, ": t must be a finite positive number, got ", t);
}

// |x_j|^2 for every row, in the accumulation type.
at::Tensor row_norms(const at::Tensor& x, DType dtype, cudaStream_t stream, const char* op) {
  at::Tensor norms = at::empty({x.size(0)}, x.options().dtype(acc_type(x.scalar_type())));
  RowNormsParams p{};
  p.dtype = dtype;
  p.x = x.data_ptr();
  p.n = static_cast<int>(x.size(0));
  p.d = static_cast<int>(x.size(1));
  p.norms = norms.data_ptr();
  check_launch(launch_row_norms(p, stream), op);
  return norms;
}

// x: [N, D] fp32 / fp64 / fp16 / bf16, CUDA, contiguous;  t > 0
// returns total [] (acc = float32, float64 for fp64 inputs)
at::Tensor exp_gram_fwd(const at::Tensor& x, double t) {
  check_features(x, kFwd, "x");
  check_t(t, kFwd);
  DeviceScope device_scope(x);
  check_arch(x, kFwd);
  const DType dtype = to_dtype(x.scalar_type(), kFwd, "x");
  const cudaStream_t stream = current_stream();
  const int64_t n = x.size(0), d = x.size(1);

  at::Tensor norms = row_norms(x, dtype, stream, kFwd);
  const int64_t block_rows = exp_gram_fwd_block_rows(dtype);
  const int64_t nb = (n + block_rows - 1) / block_rows;
  const int64_t tiles = nb * (nb + 1) / 2;
  // Persistent blocks: two per SM (the tile needs ~110 KiB of shared memory), never more than tiles.
  const int64_t sms = multiprocessor_count();
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tiles, 2 * sms)));
  at::Tensor partials = at::empty({grid}, norms.options());

  ExpGramFwdParams p{};
  p.dtype = dtype;
  p.x = x.data_ptr();
  p.norms = norms.data_ptr();
  p.t = t;
  p.n = static_cast<int>(n);
  p.d = static_cast<int>(d);
  p.vec = can_vectorize({x}, d);
  p.grid = grid;
  p.partials = partials.data_ptr();
  check_launch(launch_exp_gram_fwd(p, max_smem_optin(), stream), kFwd);
  return partials.sum();
}

// grad_total: one element, the upstream gradient of the total;  x: [N, D];  t > 0
// returns grad_x [N, D] in x's dtype
at::Tensor exp_gram_bwd(const at::Tensor& grad_total, const at::Tensor& x, double t) {
  check_features(x, kBwd, "x");
  check_t(t, kBwd);
  DeviceScope device_scope(x);
  check_arch(x, kBwd);
  const at::Tensor g = scalar_arg(grad_total, x, kBwd, "grad_total");
  const DType dtype = to_dtype(x.scalar_type(), kBwd, "x");
  const cudaStream_t stream = current_stream();

  at::Tensor norms = row_norms(x, dtype, stream, kBwd);
  at::Tensor grad_x = at::empty_like(x);
  ExpGramBwdParams p{};
  p.dtype = dtype;
  p.x = x.data_ptr();
  p.norms = norms.data_ptr();
  p.grad = g.data_ptr();
  p.t = t;
  p.n = static_cast<int>(x.size(0));
  p.d = static_cast<int>(x.size(1));
  p.vec = can_vectorize({x}, x.size(1));
  p.grad_x = grad_x.data_ptr();
  check_launch(launch_exp_gram_bwd(p, max_smem_optin(), stream), kBwd);
  return grad_x;
}

}  // namespace
}  // namespace lsr

LSR_LIBRARY_FRAGMENT(LSR_OPS_NAMESPACE, m) {
  m.def("exp_gram_fwd(Tensor x, float t) -> Tensor");
  m.def("exp_gram_bwd(Tensor grad_total, Tensor x, float t) -> Tensor");
}

LSR_LIBRARY_IMPL(LSR_OPS_NAMESPACE, LSR_DISPATCH_KEY, m) {
  m.impl("exp_gram_fwd", &lsr::exp_gram_fwd);
  m.impl("exp_gram_bwd", &lsr::exp_gram_bwd);
}
