"""``chunked``: the memory-efficient pure-PyTorch backend (CPU, and any GPU without Triton).

The three primitives of the backend contract (:mod:`lsr_kernels.backends`), each a hand-written
:class:`torch.autograd.Function` that walks the similarity matrix in row blocks (and, for the wide
ITC matrix, column blocks), keeps only O(N) statistics between the forward and the backward, and
recomputes every block in the backward (one exception below). No N x N (or N x (N + K)) tensor is ever allocated: the
extra memory is O((N + K) D) for the gradient accumulators plus a few tiles of ``block x columns``
(see :func:`default_block_size`). Formulas: SPEC.md 2.1, 2.2 (uniformity), 2.6.

``info_nce(a, b, s, symmetric, offset)``, ``X = s a b^T``, ``r_i = LSE_j X_ij``, ``c_j = LSE_i X_ij``:
    loss ``= mean_i (r_i - X_ii)`` (``symmetric``: the mean of that and ``mean_j (c_j - X_jj)``), each
    ``r_i - X_ii`` formed as ``(max_i - X_ii) + log sum_j exp(X_ij - max_i)`` (:mod:`lsr_kernels._tiles`);
    ``c`` comes from the same row blocks as ``r``, its max and sum merged over blocks.
    ``dL/dX = w (P_row + P_col - 2 I)`` (``symmetric``, ``w = g / 2N``) or ``w (P_row - I)``
    (``w = g / N``) with ``P_row = exp(X - r_i)``, ``P_col = exp(X - c_j)``;
    ``da = s dL/dX b``, ``db = s dL/dX^T a``, ``ds = sum_ij dL/dX_ij <a_i, b_j>``. One-way, ``b`` may
    have ``M`` rows and ``I`` is shifted by ``offset``; in fp32/fp64 with a feature gradient to come,
    the one-way gradients are formed in the forward (a block holds whole rows, so ``P_row`` is final
    there): no recompute in the backward, which only scales them (:class:`_InfoNCEEager`).
``exp_gram_sum(x, t)``, ``K_jk = exp(-t (|x_j|^2 + |x_k|^2 - 2 <x_j, x_k>))``:
    ``sum_jk K_jk`` over the tiles on or above the diagonal only (off-diagonal tiles count twice);
    ``dx_j = -4 t g sum_k K_jk (x_j - x_k) = -4 t g (rowsum(K)_j x_j - (K x)_j)``, each upper tile
    feeding its rows directly and its columns through its transpose.
``itc_soft_ce(q, q_m, bank, s, alpha)``, ``X = s q bank^T``, ``X_m = s q_m bank^T`` (``N x M``):
    loss ``= mean_i (LSE_j X_ij - alpha sum_j softmax(X_m)_ij X_ij - (1 - alpha) X_ii)``, the soft
    target term accumulated over column blocks with an online rescaling (running max, sum and
    weighted sum of ``max_i - X_ij``); ``dL/dX = (g / N) (P - Y)``, ``dq = s dL/dX bank``,
    ``ds = sum_ij dL/dX_ij <q_i, bank_j>``. No gradient for ``q_m`` or ``bank``.

Precision: the matmuls of ``info_nce`` and ``itc_soft_ce`` run in the input dtype (tensor cores for
fp16/bf16, and the same rounding of the logits as the reference); softmax statistics, the tiles'
elementwise work and every accumulator are fp32 (fp64 for fp64 inputs, for gradcheck). The
uniformity Gram runs in fp32 even for fp16/bf16 inputs, as the reference does: ``exp(-t d^2)``
multiplies a bf16 rounding of ``<x_j, x_k>`` by ``2t`` in the exponent, which would cost ~1% per entry.
Losses come back as 0-dim fp32 (fp64 for fp64 inputs), gradients in each input's dtype.

Block size: every primitive takes ``block_size`` (rows per tile, ``None`` = automatic);
``itc_soft_ce`` also ``col_block_size`` (bank columns per tile). The environment variable
``LSR_CHUNKED_BLOCK`` (a positive integer, read at each call) sets the rows per tile for every call
that does not pass ``block_size``; without either, :func:`default_block_size` decides.

``torch.compile``: the primitives are excluded from tracing (a graph break); they run eagerly inside
a compiled model, with their hand-written backward.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import _validation as V
from .._tiles import exp_, exp_sums, merge_exp_sums, sub_max_, take_positives

__all__ = ["default_block_size", "info_nce", "exp_gram_sum", "itc_soft_ce"]

#: Environment variable that overrides the rows per tile of every call without ``block_size``.
BLOCK_ENV = "LSR_CHUNKED_BLOCK"

# One fp32 tile of the similarity matrix, per device kind. A call keeps 2-3 tiles alive at a time.
# CPU: taller blocks run the block matmuls closer to BLAS peak and amortise the per-op cost of the
# elementwise sweeps; measured on a 2-core EPYC at N = 8192, D = 512 (fwd + bwd, one thread):
# 6.6 / 5.0 / 5.0 / 4.5 / 4.3 s CPU for 64 / 128 / 256 / 512 / 1024 rows. 32 MiB (512 rows at
# N = 16384) keeps the live tiles near 100 MiB there, a few percent of what N x N logits take.
# GPUs: tiles are far cheaper than the gradients of any batch that needs this backend, and bigger
# tiles mean fewer, fuller kernel launches.
_CPU_TILE_BYTES = 32 << 20
_ACCELERATOR_TILE_BYTES = 256 << 20
# Below ~32 rows a block's matmul is too thin for BLAS/cuBLAS to be efficient.
_MIN_BLOCK = 32


def _tile_bytes(device: torch.device) -> int:
    return _CPU_TILE_BYTES if torch.device(device).type == "cpu" else _ACCELERATOR_TILE_BYTES


def default_block_size(n: int, d: int, device) -> int:
    """Rows per tile when a tile spans ``n`` columns of ``d``-wide features on ``device``.

    A tile is ``rows x n`` fp32, so memory bounds ``rows``: as many as fit the device's tile budget
    (32 MiB on CPU, 256 MiB on GPUs; a call keeps 2-3 tiles alive). Bigger is faster (fewer, taller
    matmuls and elementwise sweeps), so the budget is the only reason to stop. Two floors keep the
    block's matmuls efficient when ``n`` is huge: at least 32 rows, and at least ``d / 2`` rows,
    because every block re-reads the ``[n, d]`` operand and read-modify-writes an ``[n, d]``
    gradient accumulator, which must stay small next to the ``rows x n x d`` matmul work (either
    floor keeps a tile within O(n d) memory). Never more than ``n`` (a batch that fits in one tile
    is one block), and a multiple of 32 when above it.
    """
    if n < 1 or d < 1:
        raise ValueError(f"default_block_size: expected n >= 1 and d >= 1, got n = {n}, d = {d}")
    rows = max(_tile_bytes(device) // (4 * n), _MIN_BLOCK, d // 2)
    if rows > _MIN_BLOCK:
        rows -= rows % _MIN_BLOCK
    return min(rows, n)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _rows_per_block(block_size: Optional[int], n_rows: int, n_cols: int, d: int, device) -> int:
    """Explicit ``block_size``, else ``LSR_CHUNKED_BLOCK``, else :func:`default_block_size`."""
    if block_size is not None:
        return min(_positive_int("block_size", block_size), n_rows)
    env = os.environ.get(BLOCK_ENV)
    if env:
        try:
            rows = int(env)
        except ValueError:
            rows = 0
        if rows < 1:
            raise ValueError(f"{BLOCK_ENV}: expected a positive integer, got {env!r}")
        return min(rows, n_rows)
    return min(default_block_size(n_cols, d, device), n_rows)


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics and accumulation: fp32 for fp16/bf16/fp32, fp64 kept (gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(buffer: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous ``rows x cols`` view at the start of a flat scratch buffer (reused every block:
    on CPU a fresh multi-MiB allocation per block costs page faults comparable to the exp work)."""
    return buffer[: rows * cols].view(rows, cols)


def _scale_as(scale: Tensor, wide: torch.dtype) -> Tensor:
    return scale.detach().reshape(()).to(wide)


def _logits(rows: Tensor, cols_t: Tensor, s: Tensor, out: Tensor, lp_buf: Optional[Tensor]) -> Tensor:
    """``out = s * (rows @ cols_t)`` in the wide dtype.

    fp32/fp64 (``lp_buf`` None): ``s`` is folded into the block's rows before the matmul (one pass
    over the tile fewer). fp16/bf16: the product in the input dtype (in ``lp_buf``), scaled while it
    is widened, exactly the rounding of the reference's ``s * (a @ b.T).float()``.
    """
    if lp_buf is None:
        return torch.mm(rows * s, cols_t, out=out)
    # Widen, then scale: a 0-dim fp32 ``s`` times a bf16 tile would multiply (and round) in bf16.
    return out.copy_(torch.mm(rows, cols_t, out=_tile(lp_buf, *out.shape))).mul_(s)


def _narrow_for_matmul(tile: Tensor, lp_buf: Optional[Tensor]) -> Tensor:
    """The gradient tile as the operand of the gradient matmuls: cast into ``lp_buf`` for fp16/bf16
    (the dtype the reference's backward multiplies in), the tile itself otherwise."""
    return tile if lp_buf is None else _tile(lp_buf, *tile.shape).copy_(tile)


def _scale_grad_from_features(x: Tensor, grad_x: Tensor, s: Tensor) -> Tensor:
    """``dL/ds`` from a finished feature gradient: with ``grad_x = s (dL/dX) y`` for ``X = s x y^T``,
    ``sum(x * grad_x) / s = sum_ij dL/dX_ij <x_i, y_j> = dL/ds``. O(N D) instead of another
    elementwise pass over every tile."""
    wide = s.dtype
    return torch.tensordot(x.to(wide), grad_x.to(wide), dims=2) / s


# ------------------------------------------------------------------------------------- info_nce
class _InfoNCEEager(torch.autograd.Function):
    """One-way ``CE(s a b^T)`` in fp32/fp64 with its gradients formed during the forward.

    A row block's tile holds whole rows, so the row softmax ``P`` is complete as soon as its
    log-sum-exp is: ``H = P - I`` (shifted by ``offset``) multiplies ``b`` and ``a`` right there. Three
    products of ``N x M x D`` instead of four (no recompute in the backward) and one exp pass instead of
    two; the backward only scales the saved gradients by the upstream one. fp16/bf16 keep the lazy
    path (:class:`_InfoNCE`): their gradient tile is rounded to the input dtype after that scaling.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, scale: Tensor, offset: int, block: int) -> Tensor:
        n, m = a.shape[0], b.shape[0]
        dev, wide = a.device, a.dtype
        s = _scale_as(scale, wide)
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        row_excess = torch.empty(n, dtype=wide, device=dev)  # lse_i - X_i,pos
        grad_a = torch.empty_like(a, memory_format=torch.contiguous_format) if need_a else None
        grad_b = torch.zeros(b.shape, dtype=wide, device=dev) if need_b else None
        logits_buf = torch.empty(block * m, dtype=wide, device=dev)
        b_t = b.T
        weight = s / n  # dL/d(a b^T) = (s / n) H; the upstream gradient is applied in the backward
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            a_blk = a[i0:i1]
            logits = _logits(a_blk, b_t, s, _tile(logits_buf, i1 - i0, m), None)
            positive = logits.diagonal(offset=offset + i0).clone()
            top, shifted = sub_max_(logits, 1)
            p = exp_(shifted)  # exp(X - max), in place: X is not needed again
            total = p.sum(1)
            row_excess[i0:i1] = (top - positive).add_(total.log())  # (see exp_sums)
            h = p.div_(total[:, None])
            h.diagonal(offset=offset + i0).sub_(1.0)
            h.mul_(weight)
            if need_a:
                torch.mm(h, b, out=grad_a[i0:i1])
            if need_b:
                grad_b.addmm_(h.T, a_blk)
        grad_s = None
        if need_scale:
            grad_s = _scale_grad_from_features(b, grad_b, s) if need_b else _scale_grad_from_features(a, grad_a, s)
        ctx.save_for_backward(grad_a, grad_b, grad_s)
        ctx.scale_meta = (scale.dtype, scale.shape)
        return row_excess.mean()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        V.refuse_double_backward("chunked", "info_nce")
        grad_a, grad_b, grad_s = ctx.saved_tensors
        g = grad_loss.to(grad_a.dtype if grad_a is not None else grad_b.dtype)
        scale_dtype, scale_shape = ctx.scale_meta
        return (None if grad_a is None else grad_a * g, None if grad_b is None else grad_b * g,
                None if grad_s is None else (grad_s * g).to(scale_dtype).reshape(scale_shape), None, None)


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, offset: int, block: int) -> Tensor:
        n, m = a.shape[0], b.shape[0]  # m == n when symmetric
        wide = _wide_dtype(a.dtype)
        dev = a.device
        s = _scale_as(scale, wide)
        row_lse = torch.empty(n, dtype=wide, device=dev)
        row_excess = torch.empty(n, dtype=wide, device=dev)  # lse_i - X_i,pos (see exp_sums)
        positives = torch.empty(n, dtype=wide, device=dev)
        # the column direction's (top, total), merged over row blocks
        col_top = torch.full((n,), float("-inf"), dtype=wide, device=dev) if symmetric else None
        col_total = torch.zeros(n, dtype=wide, device=dev) if symmetric else None

        logits_buf = torch.empty(block * m, dtype=wide, device=dev)
        scratch_buf = torch.empty(block * m, dtype=wide, device=dev)
        lp_buf = torch.empty(block * m, dtype=a.dtype, device=dev) if a.dtype != wide else None
        b_t = b.T
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            rows = i1 - i0
            logits = _logits(a[i0:i1], b_t, s, _tile(logits_buf, rows, m), lp_buf)
            positives[i0:i1] = logits.diagonal(offset=offset + i0)
            top, total = exp_sums(logits, 1, _tile(scratch_buf, rows, m))
            log_total = total.log()
            row_lse[i0:i1] = top + log_total
            row_excess[i0:i1] = (top - positives[i0:i1]).add_(log_total)
            if symmetric:  # the column direction from the same tile (its last use), merged over blocks
                col_top, col_total = merge_exp_sums(col_top, col_total, *exp_sums(logits, 0))

        loss = row_excess.mean()
        col_lse = None
        if symmetric:
            log_total = col_total.log()
            col_lse = col_top + log_total
            loss = (loss + (col_top - positives).add_(log_total).mean()) / 2
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.symmetric, ctx.offset, ctx.block = symmetric, offset, block
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        V.refuse_double_backward("chunked", "info_nce")
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        if not (need_a or need_b or need_scale):
            return None, None, None, None, None, None
        symmetric, offset, block = ctx.symmetric, ctx.offset, ctx.block
        n, m = a.shape[0], b.shape[0]
        wide = _wide_dtype(a.dtype)
        dev = a.device
        s = _scale_as(scale, wide)
        # dL/dX = weight * H with H = P_row (+ P_col) - (1 or 2) I; dL/d(a b^T) = s dL/dX.
        weight = grad_loss.to(wide) / (2 * n if symmetric else n)
        grad_weight = weight * s
        low_precision = a.dtype != wide
        # fp32/fp64 with a feature gradient: dL/ds from it at the end (_scale_grad_from_features).
        # Otherwise sum(H * X) tile by tile: with no feature gradient there is nothing to take it
        # from, and fp16/bf16 feature gradients are rounded (3-7x the reference's error in dL/ds).
        scale_by_tile = need_scale and (low_precision or not (need_a or need_b))

        grad_a = torch.empty_like(a, memory_format=torch.contiguous_format) if need_a else None
        grad_b = torch.zeros(b.shape, dtype=wide, device=dev) if need_b else None
        scale_acc = torch.zeros((), dtype=wide, device=dev) if scale_by_tile else None

        logits_buf = torch.empty(block * m, dtype=wide, device=dev)
        tile_buf = torch.empty(block * m, dtype=wide, device=dev)
        extra_buf = torch.empty(block * m, dtype=wide, device=dev) if scale_by_tile else None
        lp_buf = torch.empty(block * m, dtype=a.dtype, device=dev) if low_precision else None
        grad_b_part = torch.empty(b.shape, dtype=a.dtype, device=dev) if need_b and low_precision else None
        b_t = b.T
        diag_count = 2.0 if symmetric else 1.0
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            rows = i1 - i0
            a_blk = a[i0:i1]
            logits = _logits(a_blk, b_t, s, _tile(logits_buf, rows, m), lp_buf)
            # tile = H = exp(X - r_i) (+ exp(X - c_j)) - (1 or 2) on the positives
            tile = exp_(torch.sub(logits, row_lse[i0:i1, None], out=_tile(tile_buf, rows, m)))
            if symmetric:
                col_part = logits if not scale_by_tile else _tile(extra_buf, rows, m).copy_(logits)
                tile.add_(exp_(col_part.sub_(col_lse[None, :])))
            tile.diagonal(offset=offset + i0).sub_(diag_count)
            if scale_by_tile:
                scale_acc += torch.mul(tile, logits, out=_tile(extra_buf, rows, m)).sum()
            if not (need_a or need_b):
                continue
            operand = _narrow_for_matmul(tile.mul_(grad_weight), lp_buf)
            if need_a:
                torch.mm(operand, b, out=grad_a[i0:i1])
            if need_b:
                if low_precision:
                    grad_b.add_(torch.mm(operand.T, a_blk, out=grad_b_part))
                else:
                    grad_b.addmm_(operand.T, a_blk)

        grad_scale = None
        if need_scale:
            if scale_by_tile:
                grad_scale = scale_acc * weight / s  # scale_acc = sum(H * X) = s sum(H * a b^T)
            elif need_b:
                grad_scale = _scale_grad_from_features(b, grad_b, s)
            else:
                grad_scale = _scale_grad_from_features(a, grad_a, s)
            grad_scale = grad_scale.to(scale.dtype).reshape(scale.shape)
        if grad_b is not None:
            grad_b = grad_b.to(b.dtype)
        return grad_a, grad_b, grad_scale, None, None, None


def _eager_only(fn):
    """Exclude ``fn`` from torch.compile's tracing, saying why when fullgraph=True trips over it."""
    reason = ("lsr_kernels' chunked backend (the default on CPU) runs eagerly, with its hand-written "
              "backward; for a compiled graph without breaks pass backend='reference' (CPU) or "
              "backend='triton' / 'cuda' (GPU)")
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:  # torch before 2.7 takes no reason
        return torch.compiler.disable(fn)


@_eager_only
def info_nce(a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, offset: int = 0, *,
             block_size: Optional[int] = None) -> Tensor:
    """``CE(s a b^T)``, or ``(CE(s a b^T) + CE(s b a^T)) / 2`` when ``symmetric``; one-way with a
    rectangular ``b`` and the positives at ``offset`` (contract in :mod:`lsr_kernels.backends`), in
    row blocks of ``block_size`` with O(N) saved statistics."""
    offset = V.check_info_nce_operands(a, b, symmetric, offset)
    block = _rows_per_block(block_size, a.shape[0], b.shape[0], a.shape[1], a.device)
    # One-way in fp32/fp64 with a feature gradient to come: gradients in the forward (one pass).
    if (not symmetric and a.dtype in (torch.float32, torch.float64) and torch.is_grad_enabled()
            and (a.requires_grad or b.requires_grad)):
        return _InfoNCEEager.apply(a, b, scale, offset, block)
    return _InfoNCE.apply(a, b, scale, bool(symmetric), offset, block)


# --------------------------------------------------------------------------------- exp_gram_sum
def _exp_gram_tile(x: Tensor, sq_norms: Tensor, t: float, i0: int, i1: int, buffer: Tensor) -> Tensor:
    """``K[i0:i1, i0:] = exp(-t (|x_j|^2 + |x_k|^2 - 2 <x_j, x_k>))``: the tile of block rows against
    every column on or right of the diagonal, in ``buffer``."""
    rows, cols = i1 - i0, x.shape[0] - i0
    tile = _tile(buffer, rows, cols)
    # 2t <x_j, x_k> - t |x_k|^2 in one addmm, then - t |x_j|^2 and the exp in place.
    torch.addmm(sq_norms[None, i0:], x[i0:i1], x[i0:].T, beta=-t, alpha=2 * t, out=tile)
    return exp_(tile.sub_(sq_norms[i0:i1, None], alpha=t))


class _ExpGramSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, t: float, block: int) -> Tensor:
        n = x.shape[0]
        xw = x.to(_wide_dtype(x.dtype))  # see the module docstring: the Gram stays fp32
        sq_norms = xw.square().sum(1)
        buffer = torch.empty(block * n, dtype=xw.dtype, device=x.device)
        total = torch.zeros((), dtype=xw.dtype, device=x.device)
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            tile = _exp_gram_tile(xw, sq_norms, t, i0, i1, buffer)
            # The diagonal tile once, the tiles right of it twice (they stand for their transposes too).
            total += 2 * tile.sum() - tile[:, : i1 - i0].sum()
        ctx.save_for_backward(x)
        ctx.t, ctx.block = t, block
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        V.refuse_double_backward("chunked", "exp_gram_sum")
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        t, block = ctx.t, ctx.block
        n = x.shape[0]
        xw = x.to(_wide_dtype(x.dtype))
        sq_norms = xw.square().sum(1)
        buffer = torch.empty(block * n, dtype=xw.dtype, device=x.device)
        # Accumulates sum_k K_jk (x_k - x_j); dx = 4 t g * that.
        acc = torch.zeros_like(xw, memory_format=torch.contiguous_format)
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            rows = i1 - i0
            tile = _exp_gram_tile(xw, sq_norms, t, i0, i1, buffer)
            # Block rows: every column k >= i0 (the diagonal tile holds both orders of its pairs).
            acc[i0:i1].addmm_(tile, xw[i0:]).addcmul_(tile.sum(1)[:, None], xw[i0:i1], value=-1)
            if i1 < n:
                # Columns right of the diagonal tile, through the transpose: rows i1.. get the pairs
                # with the block rows that no later tile covers.
                right = tile[:, rows:]
                acc[i1:].addmm_(right.T, xw[i0:i1]).addcmul_(right.sum(0)[:, None], xw[i1:], value=-1)
        acc.mul_(grad_total.to(xw.dtype) * (4 * t))
        return acc.to(x.dtype), None, None


@_eager_only
def exp_gram_sum(x: Tensor, t: float, *, block_size: Optional[int] = None) -> Tensor:
    """``sum_{j,k} exp(-t ||x_j - x_k||^2)`` (pairs ``j = k`` included) over the tiles on or above the
    diagonal only, in row blocks of ``block_size``."""
    if x.dim() != 2:
        raise ValueError(f"exp_gram_sum: x must be an [N, D] matrix, got shape {tuple(x.shape)}")
    t = V.check_positive("t", t)
    block = _rows_per_block(block_size, x.shape[0], x.shape[0], x.shape[1], x.device)
    return _ExpGramSum.apply(x, float(t), block)


# ---------------------------------------------------------------------------------- itc_soft_ce
class _ITCSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, alpha: float,
                block: int, col_block: int) -> Tensor:
        n, m = q.shape[0], bank.shape[0]
        wide = _wide_dtype(q.dtype)
        dev = q.device
        s = _scale_as(scale, wide)
        distill = alpha > 0.0  # alpha = 0: one-hot targets, the momentum logits are never needed
        top, log_total = torch.empty(n, dtype=wide, device=dev), torch.empty(n, dtype=wide, device=dev)
        lse_m = torch.empty(n, dtype=wide, device=dev) if distill else None
        soft_gap = torch.empty(n, dtype=wide, device=dev)  # sum_j softmax(X_m)_ij (top_i - X_ij)
        positives = torch.empty(n, dtype=wide, device=dev)

        size = block * col_block
        logits_buf = torch.empty(size, dtype=wide, device=dev)
        momentum_buf = torch.empty(size, dtype=wide, device=dev) if distill else None  # X_m tiles
        lp_buf = torch.empty(size, dtype=q.dtype, device=dev) if q.dtype != wide else None
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            rows = i1 - i0
            run_top = torch.full((rows,), float("-inf"), dtype=wide, device=dev)  # (see exp_sums)
            run_total = torch.zeros(rows, dtype=wide, device=dev)
            # Soft-target statistics, online over column blocks: running max of X_m, sum of
            # exp(X_m - max), and sum of exp(X_m - max) (top - X) against the running top of X (so the
            # loss never subtracts numbers of the logits' size, see exp_sums); rescaled together
            # when the max moves, lifted when the top does.
            run_max = torch.full((rows,), float("-inf"), dtype=wide, device=dev)
            run_sum = torch.zeros(rows, dtype=wide, device=dev)
            run_gap = torch.zeros(rows, dtype=wide, device=dev)
            for j0 in range(0, m, col_block):
                j1 = min(j0 + col_block, m)
                cols = j1 - j0
                bank_t = bank[j0:j1].T
                logits = _logits(q[i0:i1], bank_t, s, _tile(logits_buf, rows, cols), lp_buf)
                take_positives(logits, i0, i1, j0, j1, positives)
                tile_top, shifted = sub_max_(logits, 1)  # X - tile_top, in place: X's last use
                if distill:
                    weights = _logits(q_m[i0:i1], bank_t, s, _tile(momentum_buf, rows, cols), lp_buf)
                    new_max = torch.maximum(run_max, weights.amax(1))
                    new_max.masked_fill_(new_max == float("-inf"), 0.0)  # a row of -inf: no nan
                    rescale = (run_max - new_max).exp_()
                    exp_(weights.sub_(new_max[:, None]))
                    weight_sum = weights.sum(1)
                    tile_gap = weights.mul_(shifted).sum(1).neg_()  # sum w (tile_top - X) >= 0
                prev_top = run_top
                run_top, run_total = merge_exp_sums(run_top, run_total, tile_top, exp_(shifted).sum(1))
                if distill:
                    # both gaps measured from the new running top: earlier columns lifted by how far
                    # it moved, this tile's by how far it lies above this tile's own top
                    lift = torch.where(prev_top == float("-inf"), 0.0, run_top - prev_top)
                    run_gap = ((run_gap + run_sum * lift) * rescale + tile_gap
                               + (run_top - tile_top) * weight_sum)
                    run_sum = run_sum * rescale + weight_sum
                    run_max = new_max
            top[i0:i1] = run_top
            log_total[i0:i1] = run_total.log()
            if distill:
                lse_m[i0:i1] = run_max + run_sum.log()
                soft_gap[i0:i1] = run_gap / run_sum

        # -sum_j Y_ij log P_ij = lse_i - sum_j Y_ij X_ij, as the targets sum to one; lse_i = top_i +
        # log_total_i, each X against top_i (see exp_sums)
        row_loss = log_total
        if distill:
            row_loss = row_loss + alpha * soft_gap
        if alpha < 1.0:
            row_loss = row_loss + (1.0 - alpha) * (top - positives)
        lse = top + log_total
        ctx.save_for_backward(q, q_m, bank, scale, lse, lse_m)
        ctx.alpha, ctx.block, ctx.col_block = alpha, block, col_block
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        V.refuse_double_backward("chunked", "itc_soft_ce")
        q, q_m, bank, scale, lse, lse_m = ctx.saved_tensors
        need_q, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        if not (need_q or need_scale):
            return (None,) * 7
        alpha, block, col_block = ctx.alpha, ctx.block, ctx.col_block
        n, m = q.shape[0], bank.shape[0]
        wide = _wide_dtype(q.dtype)
        dev = q.device
        s = _scale_as(scale, wide)
        distill = alpha > 0.0
        weight = grad_loss.to(wide) / n  # dL/dX = weight * (P - Y)
        grad_weight = weight * s
        low_precision = q.dtype != wide
        # As in info_nce: dL/ds from grad_q for fp32/fp64, else sum((P - Y) * X) tile by tile.
        scale_by_tile = need_scale and (low_precision or not need_q)
        one_col_block = col_block >= m
        # One column block: a row block's gradient is final after its only tile (written in place);
        # otherwise it is summed over the column blocks in the wide dtype.
        grad_q = grad_q_part = None
        if need_q:
            if one_col_block:
                grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
            else:
                grad_q = torch.zeros(q.shape, dtype=wide, device=dev)
                if low_precision:
                    grad_q_part = torch.empty(block, q.shape[1], dtype=q.dtype, device=dev)
        scale_acc = torch.zeros((), dtype=wide, device=dev) if scale_by_tile else None

        size = block * col_block
        logits_buf = torch.empty(size, dtype=wide, device=dev)
        second_buf = torch.empty(size, dtype=wide, device=dev)
        tile_buf = torch.empty(size, dtype=wide, device=dev) if scale_by_tile else None
        lp_buf = torch.empty(size, dtype=q.dtype, device=dev) if low_precision else None
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            rows = i1 - i0
            for j0 in range(0, m, col_block):
                j1 = min(j0 + col_block, m)
                cols = j1 - j0
                bank_blk = bank[j0:j1]
                logits = _logits(q[i0:i1], bank_blk.T, s, _tile(logits_buf, rows, cols), lp_buf)
                # tile = P - Y = exp(X - lse) - alpha exp(X_m - lse_m) - (1 - alpha) on the positives
                if scale_by_tile:  # X is still needed for sum(tile * X)
                    tile = exp_(torch.sub(logits, lse[i0:i1, None], out=_tile(tile_buf, rows, cols)))
                else:
                    tile = exp_(logits.sub_(lse[i0:i1, None]))
                if distill:
                    soft = _logits(q_m[i0:i1], bank_blk.T, s, _tile(second_buf, rows, cols), lp_buf)
                    tile.sub_(exp_(soft.sub_(lse_m[i0:i1, None])), alpha=alpha)
                if alpha < 1.0:
                    lo, hi = max(i0, j0), min(i1, j1)
                    if lo < hi:
                        tile[lo - i0:hi - i0, lo - j0:hi - j0].diagonal().sub_(1.0 - alpha)
                if scale_by_tile:
                    scale_acc += torch.mul(tile, logits, out=_tile(second_buf, rows, cols)).sum()
                if not need_q:
                    continue
                operand = _narrow_for_matmul(tile.mul_(grad_weight), lp_buf)
                if one_col_block:
                    torch.mm(operand, bank_blk, out=grad_q[i0:i1])
                elif low_precision:
                    grad_q[i0:i1].add_(torch.mm(operand, bank_blk, out=grad_q_part[:rows]))
                else:
                    grad_q[i0:i1].addmm_(operand, bank_blk)

        grad_scale = None
        if need_scale:
            if scale_by_tile:
                grad_scale = scale_acc * weight / s  # scale_acc = sum((P - Y) * X)
            else:
                grad_scale = _scale_grad_from_features(q, grad_q, s)
            grad_scale = grad_scale.to(scale.dtype).reshape(scale.shape)
        if grad_q is not None:
            grad_q = grad_q.to(q.dtype)
        return grad_q, None, None, grad_scale, None, None, None


@_eager_only
def itc_soft_ce(q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, alpha: float, *,
                block_size: Optional[int] = None, col_block_size: Optional[int] = None) -> Tensor:
    """``-(1/N) sum_ij Y_ij log softmax(s q bank^T)_ij`` with ``Y = alpha softmax(s q_m bank^T) +
    (1 - alpha) I`` over ``block_size x col_block_size`` tiles of the ``N x M`` logits.

    ``col_block_size=None``: the whole bank in one tile when a ``rows x M`` tile fits the device's
    tile budget, else as many columns as fit it (a queue of 65,536 on CPU is walked in slices).
    """
    if q.dim() != 2 or q_m.shape != q.shape:
        raise ValueError(f"itc_soft_ce: q and q_m must be the same [N, D] shape, got q {tuple(q.shape)}, "
                         f"q_m {tuple(q_m.shape)}")
    n, d = q.shape
    alpha = V.check_unit_interval("alpha", alpha)
    if bank.dim() != 2 or bank.shape[1] != d or bank.shape[0] < n:
        raise ValueError(f"itc_soft_ce: bank must be [M, D] with M >= N = {n} and D = {d} "
                         f"(its first N rows are the positives), got {tuple(bank.shape)}")
    m = bank.shape[0]
    block = _rows_per_block(block_size, n, m, d, q.device)
    if col_block_size is not None:
        col_block = min(_positive_int("col_block_size", col_block_size), m)
    else:
        col_block = min(m, max(_tile_bytes(q.device) // (4 * block), _MIN_BLOCK))
    return _ITCSoftCE.apply(q, q_m, bank, scale, float(alpha), block, col_block)
