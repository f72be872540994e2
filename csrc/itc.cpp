// lsr_kernels::itc_fwd / itc_bwd: schema, argument checks and dispatch (kernels in itc_kernels.cu).
// One direction of ALBEF's ITC loss with momentum distillation over a queue, SPEC 2.6.
#include <cmath>
#include <tuple>

#include "checks.h"

namespace lsr {
namespace {

constexpr const char* kFwd = "lsr_kernels::itc_fwd";
constexpr const char* kBwd = "lsr_kernels::itc_bwd";

void check_inputs(const at::Tensor& q, const at::Tensor& q_m, const at::Tensor& bank, double alpha, const char* op) {
  check_features(q, op, "q");
  check_like(q_m, q, q.size(0), op, "q_m", "q");
  check_like(bank, q, -1, op, "bank", "q");
  TORCH_CHECK_VALUE(bank.size(0) >= q.size(0), op, ": bank must hold at least as many rows as q (its first N rows are ",
                    "the positives), got bank ", bank.sizes(), " and q ", q.sizes());
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0.0 && alpha <= 1.0, op, ": alpha must be in [0, 1], got ",
                    alpha);
}

// q:     [N, D] fp32 / fp64 / fp16 / bf16, CUDA, contiguous (the online features)
// q_m:   [N, D] momentum features of the same samples (soft targets only)
// bank:  [M, D], M >= N: [momentum features of the other modality; queue]; row i pairs with q's row i
// scale: one element;  alpha in [0, 1]
// returns loss [] (acc), lse [N] (acc), lse_m [N] (acc)
std::tuple<at::Tensor, at::Tensor, at::Tensor> itc_fwd(const at::Tensor& q, const at::Tensor& q_m,
                                                       const at::Tensor& bank, const at::Tensor& scale, double alpha) {
  check_inputs(q, q_m, bank, alpha, kFwd);
  DeviceScope device_scope(q);
  check_arch(q, kFwd);
  const at::Tensor s = scalar_arg(scale, q, kFwd, "scale");
  const int64_t n = q.size(0), d = q.size(1);
  const auto acc_opts = q.options().dtype(acc_type(q.scalar_type()));
  at::Tensor lse = at::empty({n}, acc_opts), lse_m = at::empty({n}, acc_opts), row_term = at::empty({n}, acc_opts);

  ItcFwdParams p{};
  p.dtype = to_dtype(q.scalar_type(), kFwd, "q");
  p.q = q.data_ptr();
  p.q_m = q_m.data_ptr();
  p.bank = bank.data_ptr();
  p.scale = s.data_ptr();
  p.alpha = alpha;
  p.n = static_cast<int>(n);
  p.m = static_cast<int>(bank.size(0));
  p.d = static_cast<int>(d);
  p.vec = can_vectorize({q, q_m, bank}, d);
  p.lse = lse.data_ptr();
  p.lse_m = lse_m.data_ptr();
  p.row_term = row_term.data_ptr();
  check_launch(launch_itc_fwd(p, max_smem_optin(), current_stream()), kFwd);
  return {row_term.sum() / static_cast<double>(n), lse, lse_m};
}

// grad_loss: one element;  q, q_m, bank, scale, alpha: as in the forward;  lse, lse_m: [N] acc
// returns grad_q [N, D] (q's dtype), grad_scale [] (acc); q_m and bank get no gradient
std::tuple<at::Tensor, at::Tensor> itc_bwd(const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& q_m,
                                           const at::Tensor& bank, const at::Tensor& scale, const at::Tensor& lse,
                                           const at::Tensor& lse_m, double alpha) {
  check_inputs(q, q_m, bank, alpha, kBwd);
  DeviceScope device_scope(q);
  check_arch(q, kBwd);
  const int64_t n = q.size(0), d = q.size(1);
  check_stats(lse, q, n, kBwd, "lse");
  check_stats(lse_m, q, n, kBwd, "lse_m");
  const at::Tensor s = scalar_arg(scale, q, kBwd, "scale");
  const at::Tensor g = scalar_arg(grad_loss, q, kBwd, "grad_loss");
  const DType dtype = to_dtype(q.scalar_type(), kBwd, "q");
  const int64_t block_rows = itc_bwd_block_rows(dtype);

  at::Tensor grad_q = at::empty_like(q);
  at::Tensor ds_partial = at::empty({(n + block_rows - 1) / block_rows}, q.options().dtype(acc_type(q.scalar_type())));
  ItcBwdParams p{};
  p.dtype = dtype;
  p.q = q.data_ptr();
  p.q_m = q_m.data_ptr();
  p.bank = bank.data_ptr();
  p.lse = lse.data_ptr();
  p.lse_m = lse_m.data_ptr();
  p.scale = s.data_ptr();
  p.grad = g.data_ptr();
  p.alpha = alpha;
  p.n = static_cast<int>(n);
  p.m = static_cast<int>(bank.size(0));
  p.d = static_cast<int>(d);
  p.vec = can_vectorize({q, q_m, bank}, d);
  p.grad_q = grad_q.data_ptr();
  p.ds_partial = ds_partial.data_ptr();
  check_launch(launch_itc_bwd(p, max_smem_optin(), current_stream()), kBwd);
  at::Tensor grad_scale = ds_partial.sum() * g.reshape({}) / static_cast<double>(n);
  return {grad_q, grad_scale};
}

}  // namespace
}  // namespace lsr

LSR_LIBRARY_FRAGMENT(LSR_OPS_NAMESPACE, m) {
  m.def("itc_fwd(Tensor q, Tensor q_m, Tensor bank, Tensor scale, float alpha) -> (Tensor, Tensor, Tensor)");
  m.def(
      "itc_bwd(Tensor grad_loss, Tensor q, Tensor q_m, Tensor bank, Tensor scale, Tensor lse, Tensor lse_m, "
      "float alpha) -> (Tensor, Tensor)");
}

LSR_LIBRARY_IMPL(LSR_OPS_NAMESPACE, LSR_DISPATCH_KEY, m) {
  m.impl("itc_fwd", &lsr::itc_fwd);
  m.impl("itc_bwd", &lsr::itc_bwd);
}
