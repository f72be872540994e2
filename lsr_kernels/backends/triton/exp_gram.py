"""Sum of a Gaussian kernel over all pairs of rows: the ``exp_gram_sum`` primitive (uniformity, SPEC 2.2).

What is computed (contract in ``lsr_kernels/backends/__init__.py``)::

    L = sum_{j,k} E_jk,   E_jk = exp(-t ||x_j - x_k||^2) = exp(-t (|x_j|^2 + |x_k|^2 - 2 <x_j, x_k>))

(the pairs ``j = k`` included), and its gradient ``dL/dx_j = -4 t sum_k E_jk (x_j - x_k)
= -4 t (r_j x_j - (E x)_j)`` with ``r_j = sum_k E_jk`` (E is symmetric, so each pair counts twice).

Kernels
    ``_row_sq_norm_kernel``: ``|x_j|^2`` once, in fp32 (saved for the backward).
    ``_exp_gram_fwd_kernel``: ``E`` is symmetric, so a program owning row block ``i`` visits only the
    tiles ``j >= i`` (on or above the diagonal), weighting off-diagonal tiles by 2; it writes one
    partial sum per row (a config-independent ``[N]`` buffer), which torch sums. The longest programs
    (small ``i``) start first, which balances the triangle well enough.
    ``_exp_gram_bwd_kernel``: recomputes full rows of ``E`` (no atomics) and accumulates ``E x`` and
    ``r`` for a block of rows and a slice of D. For fp16/bf16 operands ``E`` enters the tensor cores as
    a hi + lo pair (two products): ``r_j x_j - (E x)_j`` cancels, and a single rounding of ``E`` to
    16 bits would leave an error far above PyTorch's (whose reference computes this term in fp32).

Extra memory: O(N) (norms and per-row partials), plus an fp32 ``[splits, N, D]`` partial gradient
only when the batch is too small to fill the GPU without splitting the columns.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _validation as V
from ._common import (LOG2E, _row_slice_program, _similarity_tiles, acc_dtype, autotuned, check_matrix, interpreting,
                      kernel_dtypes, launch, padded_width, plan_backward, tile_config, tune_bucket)

# ------------------------------------------------------------------------------------ GPU configs
# FLATTEN: one software-pipelined loop over (column tile, K slice), as in softmax_ce's backward; the
# autotuner picks between both forms of the first (D = 512 workhorse) config.
FORWARD_CONFIGS = [
    tile_config(128, 128, 64, 8, 3, flatten=False),
    tile_config(128, 128, 128, 8, 2, flatten=False),
    tile_config(64, 64, 32, 4, 3, flatten=False),
    tile_config(128, 128, 64, 8, 3, flatten=True),
]
BACKWARD_CONFIGS = [
    tile_config(64, 64, 64, 8, 3, block_do=256, flatten=False),
    tile_config(128, 64, 64, 8, 3, block_do=128, flatten=False),
    tile_config(64, 64, 64, 8, 3, block_do=128, flatten=False),
    tile_config(64, 64, 32, 4, 3, block_do=128, flatten=False),
    tile_config(64, 64, 64, 8, 3, block_do=256, flatten=True),
]
#: Row-norm kernel: memory bound, one fixed shape (GPU, interpreter).
NORM_BLOCKS_GPU = (64, 128)
NORM_BLOCKS_INTERPRETER = (16, 16)


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _row_sq_norm_kernel(X_ptr, sq_ptr, N, D, stride_xn, stride_xd,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``sq[j] = |x_j|^2`` in the accumulation dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    total = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_K):
        offs_d = d0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(X_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(ACC_DTYPE)
        total += tl.sum(x * x, 1)
    tl.store(sq_ptr + rows, total, mask=row_mask)


@triton.jit
def _exp_gram_fwd_kernel(
    X_ptr, sq_ptr, row_part_ptr, N, D, stride_xn, stride_xd, neg_t_log2e_ptr,
    N_BUCKET,  # autotune key only (tune_bucket)
    D_PADDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLATTEN: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Row block ``i``: ``row_part[rows] = sum_{tiles j >= i} w_ij sum_cols E``, ``w = 1`` on the diagonal
    tile, 2 above it."""
    tl.static_assert(BLOCK_M == BLOCK_N, "the triangle of tiles needs square tiles")
    row_lo = tl.program_id(0) * BLOCK_M
    rows = row_lo + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    neg_t_log2e = tl.load(neg_t_log2e_ptr).to(ACC_DTYPE)
    sq_rows = tl.load(sq_ptr + rows, mask=row_mask, other=0.0)
    total = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for n0 in tl.range(row_lo, N, BLOCK_N, flatten=FLATTEN):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < N
        sq_cols = tl.load(sq_ptr + cols, mask=col_mask, other=0.0)
        s, _unused = _similarity_tiles(X_ptr, X_ptr, X_ptr, rows, cols, row_mask, col_mask, D,
                                       stride_xn, stride_xd, stride_xn, stride_xd, stride_xn, stride_xd,
                                       False, BLOCK_M, BLOCK_N, BLOCK_K, ACC_DTYPE, DOT_PRECISION)
        e = tl.exp2(neg_t_log2e * (sq_rows[:, None] + sq_cols[None, :] - 2.0 * s))
        e = tl.where(row_mask[:, None] & col_mask[None, :], e, 0.0)
        on_diagonal = (n0 == row_lo).to(ACC_DTYPE)
        total += tl.sum(e, 1) * (2.0 - on_diagonal)
    tl.store(row_part_ptr + rows, total, mask=row_mask)


@triton.jit
def _exp_gram_bwd_kernel(
    X_ptr, sq_ptr, coef_ptr, DX_ptr,
    N, D, stride_xn, stride_xd, stride_dxs, stride_dxn, stride_dxd, cols_per_split, neg_t_log2e_ptr,
    N_BUCKET,  # autotune key only (tune_bucket)
    D_PADDED: tl.constexpr, SPLIT_PRODUCT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    FLATTEN: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``DX[split, rows, D slice] = coef * (r x - E x)`` over the columns of this split."""
    pid_split = tl.program_id(2)
    rows, row_mask, outs, out_mask, col_lo, col_hi = _row_slice_program(N, N, D, cols_per_split,
                                                                        BLOCK_M, BLOCK_DO)
    neg_t_log2e = tl.load(neg_t_log2e_ptr).to(ACC_DTYPE)
    sq_rows = tl.load(sq_ptr + rows, mask=row_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC_DTYPE)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for n0 in tl.range(col_lo, col_hi, BLOCK_N, flatten=FLATTEN):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < col_hi
        sq_cols = tl.load(sq_ptr + cols, mask=col_mask, other=0.0)
        s, _unused = _similarity_tiles(X_ptr, X_ptr, X_ptr, rows, cols, row_mask, col_mask, D,
                                       stride_xn, stride_xd, stride_xn, stride_xd, stride_xn, stride_xd,
                                       False, BLOCK_M, BLOCK_N, BLOCK_K, ACC_DTYPE, DOT_PRECISION)
        e = tl.exp2(neg_t_log2e * (sq_rows[:, None] + sq_cols[None, :] - 2.0 * s))
        e = tl.where(col_mask[None, :], e, 0.0)
        row_sum += tl.sum(e, 1)
        x_out = tl.load(X_ptr + cols[:, None] * stride_xn + outs[None, :] * stride_xd,
                        mask=col_mask[:, None] & out_mask[None, :], other=0.0)
        e_hi = e.to(x_out.dtype)
        acc = tl.dot(e_hi, x_out, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if SPLIT_PRODUCT:
            e_lo = (e - e_hi.to(ACC_DTYPE)).to(x_out.dtype)
            acc = tl.dot(e_lo, x_out, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    x_rows = tl.load(X_ptr + rows[:, None] * stride_xn + outs[None, :] * stride_xd,
                     mask=row_mask[:, None] & out_mask[None, :], other=0.0)
    coef = tl.load(coef_ptr).to(ACC_DTYPE)
    dx = (row_sum[:, None] * x_rows.to(ACC_DTYPE) - acc) * coef
    dx_ptrs = DX_ptr + pid_split.to(tl.int64) * stride_dxs + rows[:, None] * stride_dxn + outs[None, :] * stride_dxd
    tl.store(dx_ptrs, dx.to(DX_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])


_exp_gram_fwd_tuned = autotuned(FORWARD_CONFIGS, ["N_BUCKET", "D_PADDED"])(_exp_gram_fwd_kernel)
_exp_gram_bwd_tuned = autotuned(BACKWARD_CONFIGS, ["N_BUCKET", "D_PADDED", "SPLIT_PRODUCT"])(_exp_gram_bwd_kernel)


# ----------------------------------------------------------------------------------------- launchers
def _row_sq_norms(x: Tensor) -> Tensor:
    n, d = x.shape
    sq = torch.empty((n,), dtype=acc_dtype(x.dtype), device=x.device)
    block_m, block_k = NORM_BLOCKS_INTERPRETER if interpreting() else NORM_BLOCKS_GPU
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps=4, num_stages=1)
    args = dict(X_ptr=x, sq_ptr=sq, N=n, D=d, stride_xn=x.stride(0), stride_xd=x.stride(1),
                ACC_DTYPE=kernel_dtypes(x.dtype)["ACC_DTYPE"])
    launch(_row_sq_norm_kernel, None, (triton.cdiv(n, block_m),), args, config)
    return sq


def _neg_t_log2e(t: float, x: Tensor) -> Tensor:
    # A 0-dim tensor in the accumulation dtype: a Python float argument reaches a compiled kernel as
    # fp32 even for fp64 inputs (the interpreter keeps it exact).
    return torch.full((), -t * LOG2E, dtype=acc_dtype(x.dtype), device=x.device)


def exp_gram_forward(x: Tensor, t: float, config: Optional[triton.Config] = None) -> Tuple[Tensor, Tensor]:
    """``(sum_{j,k} E_jk, |x_j|^2)``; the sum is 0-dim fp32 (fp64 for fp64 inputs)."""
    n, d = x.shape
    sq = _row_sq_norms(x)
    row_part = torch.empty_like(sq)
    args = dict(X_ptr=x, sq_ptr=sq, row_part_ptr=row_part, N=n, D=d, N_BUCKET=tune_bucket(n), stride_xn=x.stride(0),
                stride_xd=x.stride(1), neg_t_log2e_ptr=_neg_t_log2e(t, x), D_PADDED=padded_width(d),
                **kernel_dtypes(x.dtype))
    launch(_exp_gram_fwd_kernel, _exp_gram_fwd_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),), args, config)
    return row_part.sum(), sq


def exp_gram_backward(grad: Tensor, x: Tensor, sq: Tensor, t: float,
                      config: Optional[triton.Config] = None) -> Tensor:
    """``grad * dL/dx`` in ``x``'s dtype."""
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    coef = grad.to(acc).reshape(()) * (-4.0 * t)
    plan = plan_backward(n, n, d, x.device)
    splits = plan["splits"]
    if splits == 1:
        dx = torch.empty((n, d), dtype=x.dtype, device=x.device)
        dx_strides = (0, dx.stride(0), dx.stride(1))
    else:
        dx = torch.empty((splits, n, d), dtype=acc, device=x.device)
        dx_strides = dx.stride()
    args = dict(X_ptr=x, sq_ptr=sq, coef_ptr=coef, DX_ptr=dx, N=n, D=d, N_BUCKET=tune_bucket(n), stride_xn=x.stride(0),
                stride_xd=x.stride(1), stride_dxs=dx_strides[0], stride_dxn=dx_strides[1],
                stride_dxd=dx_strides[2], cols_per_split=plan["cols_per_split"], neg_t_log2e_ptr=_neg_t_log2e(t, x),
                D_PADDED=padded_width(d), SPLIT_PRODUCT=x.dtype in (torch.float16, torch.bfloat16),
                **kernel_dtypes(x.dtype))
    launch(_exp_gram_bwd_kernel, _exp_gram_bwd_tuned,
           lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_DO"]), splits), args, config)
    return dx if splits == 1 else dx.sum(0).to(x.dtype)


# ------------------------------------------------------------------------------ custom ops + autograd
@torch.library.custom_op("lsr_kernels::triton_exp_gram_sum", mutates_args=())
def _exp_gram_op(x: Tensor, t: float) -> Tuple[Tensor, Tensor]:
    return exp_gram_forward(x, t)


@_exp_gram_op.register_fake
def _exp_gram_fake(x, t):
    acc = acc_dtype(x.dtype)
    return x.new_empty((), dtype=acc), x.new_empty((x.shape[0],), dtype=acc)


@torch.library.custom_op("lsr_kernels::triton_exp_gram_sum_backward", mutates_args=())
def _exp_gram_backward_op(grad: Tensor, x: Tensor, sq: Tensor, t: float) -> Tensor:
    return exp_gram_backward(grad, x, sq, t)


@_exp_gram_backward_op.register_fake
def _exp_gram_backward_fake(grad, x, sq, t):
    return x.new_empty(x.shape)


def _exp_gram_setup(ctx, inputs, output):
    x, t = inputs
    ctx.save_for_backward(x, output[1])
    ctx.t = t


def _exp_gram_grad(ctx, grad_total, _grad_sq):
    V.refuse_double_backward("triton", "exp_gram_sum")
    x, sq = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return _exp_gram_backward_op(grad_total, x, sq, ctx.t), None


_exp_gram_op.register_autograd(_exp_gram_grad, setup_context=_exp_gram_setup)


def exp_gram_sum(x: Tensor, t: float) -> Tensor:
    """``sum_{j,k} exp(-t ||x_j - x_k||^2)``, the pair ``j = k`` included."""
    check_matrix("x", x)
    t = float(t)
    if not t > 0.0 or t == float("inf"):
        raise ValueError(f"t: expected a finite positive temperature, got {t!r}")
    return _exp_gram_op(x, t)[0]
