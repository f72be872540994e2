// lsr_kernels::info_nce_fwd / info_nce_bwd / info_nce_fwd_grad: schema, argument checks and dispatch
// (kernels in info_nce_kernels.cu). CE(X) or (CE(X) + CE(X^T)) / 2 for X = scale * a b^T, SPEC 2.1.
#include <tuple>

#include "checks.h"

namespace lsr {
namespace {

constexpr const char* kFwd = "lsr_kernels::info_nce_fwd";
constexpr const char* kBwd = "lsr_kernels::info_nce_bwd";
constexpr const char* kFwdGrad = "lsr_kernels::info_nce_fwd_grad";

// The fields every info_nce launch shares: operands, sizes, the positives' offset, load width.
template <class Params>
void set_operands(Params& p, const at::Tensor& a, const at::Tensor& b, const at::Tensor& s, int64_t offset,
                  const char* op) {
  p.dtype = to_dtype(a.scalar_type(), op, "a");
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.scale = s.data_ptr();
  p.n = static_cast<int>(a.size(0));
  p.m = static_cast<int>(b.size(0));
  p.d = static_cast<int>(a.size(1));
  p.pos_off = static_cast<int>(offset);
  p.vec = can_vectorize({a, b}, a.size(1));
}

// a:      [N, D]  fp32 / fp64 / fp16 / bf16, CUDA, contiguous
// b:      [N, D]  same dtype and device as a; one-way: [M, D] with M >= N
// scale:  one element (any floating dtype), the already-exponentiated logit scale s
// offset: one-way, the positive of row i is column offset + i (0 <= offset <= M - N); 0 when symmetric
// returns loss [] (acc), lse_row [N] (acc), lse_col [N] (acc; [0] when not symmetric)
//         acc = float32 (float64 for fp64 inputs)
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_fwd(const at::Tensor& a, const at::Tensor& b,
                                                            const at::Tensor& scale, bool symmetric,
                                                            int64_t offset) {
  check_features(a, kFwd, "a");
  check_like(b, a, symmetric ? a.size(0) : -1, kFwd, "b", "a");
  check_offset(a, b, symmetric, offset, kFwd);
  DeviceScope device_scope(a);
  check_arch(a, kFwd);
  const at::Tensor s = scalar_arg(scale, a, kFwd, "scale");
  const int64_t n = a.size(0);
  const auto acc_opts = a.options().dtype(acc_type(a.scalar_type()));
  const cudaStream_t stream = current_stream();
  const int max_smem = max_smem_optin();

  at::Tensor lse_row = at::empty({n}, acc_opts), row_term = at::empty({n}, acc_opts);
  at::Tensor lse_col = at::empty({symmetric ? n : 0}, acc_opts);
  // One pass for both directions, except in fp64 (no 128-bit CAS): there the column statistics are
  // the row statistics of the swapped problem.
  const bool fused = symmetric && a.scalar_type() != at::kDouble;
  at::Tensor diag, col_stats;
  if (fused) {
    diag = at::empty({n}, acc_opts);
    // (max, sum) = (-inf, 0) as a packed pair of fp32: low word 0xff800000, high word 0.
    col_stats = at::full({n}, static_cast<int64_t>(0xff800000LL), a.options().dtype(at::kLong));
  }

  InfoNceFwdParams p{};
  set_operands(p, a, b, s, offset, kFwd);
  p.fused_columns = fused;
  p.lse_row = lse_row.data_ptr();
  p.row_term = row_term.data_ptr();
  p.diag = fused ? diag.data_ptr() : nullptr;
  p.col_stats = fused ? reinterpret_cast<unsigned long long*>(col_stats.data_ptr<int64_t>()) : nullptr;
  check_launch(launch_info_nce_fwd(p, max_smem, stream), kFwd);

  if (!symmetric) return {row_term.sum() / static_cast<double>(n), lse_row, lse_col};

  at::Tensor col_term = at::empty({n}, acc_opts);
  if (fused) {
    InfoNceColFinalizeParams f{};
    f.col_stats = reinterpret_cast<const unsigned long long*>(col_stats.data_ptr<int64_t>());
    f.diag = diag.data_ptr<float>();
    f.scale = s.data_ptr<float>();
    f.n = static_cast<int>(n);
    f.lse_col = lse_col.data_ptr<float>();
    f.col_term = col_term.data_ptr<float>();
    check_launch(launch_info_nce_col_finalize(f, stream), kFwd);
  } else {
    InfoNceFwdParams q = p;
    q.a = b.data_ptr();
    q.b = a.data_ptr();
    q.lse_row = lse_col.data_ptr();
    q.row_term = col_term.data_ptr();
    check_launch(launch_info_nce_fwd(q, max_smem, stream), kFwd);
  }
  return {(row_term.sum() + col_term.sum()) / static_cast<double>(2 * n), lse_row, lse_col};
}

// One-way CE(s a b^T) with a's gradient formed in the same pass (no recompute in the backward).
// a: [N, D], b: [M, D] (M >= N), scale, offset: as info_nce_fwd with symmetric = false
// returns loss [] (acc), lse_row [N] (acc), grad_unit [N, D] (acc): sum_j P_ij b_j - b_(i + offset),
//         ds [] (acc): sum_ij (P - I)_ij <a_i, b_j>;  dL/da = g s / N grad_unit, dL/ds = g / N ds
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_grad(const at::Tensor& a,
                                                                             const at::Tensor& b,
                                                                             const at::Tensor& scale,
                                                                             int64_t offset) {
  check_features(a, kFwdGrad, "a");
  check_like(b, a, -1, kFwdGrad, "b", "a");
  check_offset(a, b, false, offset, kFwdGrad);
  DeviceScope device_scope(a);
  check_arch(a, kFwdGrad);
  const at::Tensor s = scalar_arg(scale, a, kFwdGrad, "scale");
  const int64_t n = a.size(0);
  const auto acc_opts = a.options().dtype(acc_type(a.scalar_type()));
  at::Tensor lse_row = at::empty({n}, acc_opts), row_term = at::empty({n}, acc_opts);
  at::Tensor ds_row = at::empty({n}, acc_opts);
  // acc, not a's dtype: the backward scales it by g s / N, then rounds once
  at::Tensor grad_unit = at::empty({n, a.size(1)}, acc_opts);

  InfoNceFwdGradParams p{};
  set_operands(p, a, b, s, offset, kFwdGrad);
  p.lse_row = lse_row.data_ptr();
  p.row_term = row_term.data_ptr();
  p.grad_unit = grad_unit.data_ptr();
  p.ds_row = ds_row.data_ptr();
  check_launch(launch_info_nce_fwd_grad(p, max_smem_optin(), current_stream()), kFwdGrad);
  // The kernel left the positives out of the product (P_pos rounded to the input dtype would lose
  // 1 - P_pos on a well-aligned batch): sum_j P_ij b_j - b_pos = that - (1 - P_pos) b_pos, with
  // 1 - P_pos = -expm1(-(lse_i - X_pos)) from the cancellation-free row term.
  grad_unit.addcmul_(at::expm1(row_term.neg()).unsqueeze(1), b.narrow(0, offset, n));
  return {row_term.sum() / static_cast<double>(n), lse_row, grad_unit, ds_row.sum()};
}

// grad_loss:  one element, the upstream gradient of the loss
// a, b:       [N, D] and [N, D] or [M, D] as in the forward;  scale: one element;  offset as the forward
// lse_row:    [N] acc;  lse_col: [N] acc when symmetric (ignored otherwise)
// returns grad_a [N, D] ([0] unless compute_grad_a), grad_b like b ([0] unless compute_grad_b),
//         grad_scale [] (acc; 0 unless compute_grad_a: it comes from grad_a's launch)
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_bwd(const at::Tensor& grad_loss, const at::Tensor& a,
                                                            const at::Tensor& b, const at::Tensor& scale,
                                                            const at::Tensor& lse_row, const at::Tensor& lse_col,
                                                            bool symmetric, bool compute_grad_b, int64_t offset,
                                                            bool compute_grad_a) {
  check_features(a, kBwd, "a");
  check_like(b, a, symmetric ? a.size(0) : -1, kBwd, "b", "a");
  check_offset(a, b, symmetric, offset, kBwd);
  DeviceScope device_scope(a);
  check_arch(a, kBwd);
  const int64_t n = a.size(0), m = b.size(0);
  check_stats(lse_row, a, n, kBwd, "lse_row");
  if (symmetric) check_stats(lse_col, a, n, kBwd, "lse_col");
  const at::Tensor s = scalar_arg(scale, a, kBwd, "scale");
  const at::Tensor g = scalar_arg(grad_loss, a, kBwd, "grad_loss");
  const auto acc_opts = a.options().dtype(acc_type(a.scalar_type()));
  const cudaStream_t stream = current_stream();
  const int max_smem = max_smem_optin();
  const DType dtype = to_dtype(a.scalar_type(), kBwd, "a");
  const double inv_norm = 1.0 / (static_cast<double>(symmetric ? 2 : 1) * static_cast<double>(n));
  const int block_rows = info_nce_bwd_block_rows(dtype);

  at::Tensor grad_a = compute_grad_a ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor ds_partial = compute_grad_a ? at::empty({(n + block_rows - 1) / block_rows}, acc_opts)
                                         : at::zeros({1}, acc_opts);
  InfoNceBwdParams p{};
  set_operands(p, a, b, s, offset, kBwd);
  p.lse_a = lse_row.data_ptr();
  p.lse_b = symmetric ? lse_col.data_ptr() : lse_row.data_ptr();  // read only when symmetric
  p.grad = g.data_ptr();
  p.use_row = true;
  p.use_col = symmetric;
  p.inv_norm = inv_norm;
  p.grad_a = grad_a.data_ptr();
  p.ds_partial = ds_partial.data_ptr();
  if (compute_grad_a) check_launch(launch_info_nce_bwd(p, max_smem, stream), kBwd);

  at::Tensor grad_b = at::empty({0}, a.options());
  if (compute_grad_b) {
    // grad_b is the left-operand gradient of the transposed problem: X^T = s b a^T, whose row
    // statistics are lse_col and column statistics lse_row.
    grad_b = at::empty_like(b);
    // Row j of b is the positive of row j - offset of a (rows outside a's range have none).
    InfoNceBwdParams q = p;
    q.a = b.data_ptr();
    q.b = a.data_ptr();
    q.n = static_cast<int>(m);
    q.m = static_cast<int>(n);
    q.pos_off = -static_cast<int>(offset);
    q.lse_a = symmetric ? lse_col.data_ptr() : lse_row.data_ptr();  // read only when symmetric
    q.lse_b = lse_row.data_ptr();
    q.use_row = symmetric;
    q.use_col = true;
    q.grad_a = grad_b.data_ptr();
    q.ds_partial = nullptr;
    check_launch(launch_info_nce_bwd(q, max_smem, stream), kBwd);
  }
  at::Tensor grad_scale = ds_partial.sum() * g.reshape({}) * inv_norm;
  return {grad_a, grad_b, grad_scale};
}

}  // namespace
}  // namespace lsr

LSR_LIBRARY_FRAGMENT(LSR_OPS_NAMESPACE, m) {
  m.def("info_nce_fwd(Tensor a, Tensor b, Tensor scale, bool symmetric, int offset) -> (Tensor, Tensor, Tensor)");
  m.def(
      "info_nce_bwd(Tensor grad_loss, Tensor a, Tensor b, Tensor scale, Tensor lse_row, Tensor lse_col, "
      "bool symmetric, bool compute_grad_b, int offset, bool compute_grad_a=True) -> (Tensor, Tensor, Tensor)");
  m.def("info_nce_fwd_grad(Tensor a, Tensor b, Tensor scale, int offset) -> (Tensor, Tensor, Tensor, Tensor)");
}

LSR_LIBRARY_IMPL(LSR_OPS_NAMESPACE, LSR_DISPATCH_KEY, m) {
  m.impl("info_nce_fwd", &lsr::info_nce_fwd);
  m.impl("info_nce_bwd", &lsr::info_nce_bwd);
  m.impl("info_nce_fwd_grad", &lsr::info_nce_fwd_grad);
}
