"""Softmax cross-entropy over a tiled similarity matrix: the ``info_nce`` and ``itc_soft_ce`` primitives.

What is computed (SPEC.md 2.1, 2.2, 2.6; the contract is in ``lsr_kernels/backends/__init__.py``),
with ``X = s q k^T`` and ``CE(X) = mean_i (LSE_j X_ij - X_ii)``:

``info_nce(a, b, s, symmetric, offset)``
    ``q = a, k = b``: ``CE(X)``; symmetric: ``(CE(X) + CE(X^T)) / 2``, the column LSE of the same tiles.
    One-way, ``b`` may have ``M >= N`` rows with the positive of row ``i`` at column ``offset + i``
    (one rank's rows against every rank's columns); the kernels take it as ``pos_off``.
``itc_soft_ce(q, q_m, bank, s, alpha)``
    ``k = bank`` (``M >= N`` rows, the first ``N`` are the positives), ``Xm = s q_m bank^T``:
    ``mean_i [LSE_j X_ij - alpha sum_j softmax(Xm)_ij X_ij - (1 - alpha) X_ii]`` (each target row
    sums to one). The targets are constants: no gradient for ``q_m`` or ``bank``.

Gradients: ``dL/dX = w G'`` with ``G' = P_row - I (+ P_col - I when symmetric)``, ``w = 1/N (1/(2N))``
for info_nce, and ``G' = P - alpha Pm - (1 - alpha) I``, ``w = 1/N`` for ITC. Then
``dq = s w G' k``, ``dk = s w G'^T q`` and ``ds = w sum_ij G'_ij <q_i, k_j>``, reduced in fp32 from
the same recomputed tiles inside the ``dq`` kernel (no extra pass; the tensor-core product rounds
``G'`` to the input dtype, this sum does not).

Kernels
    ``_softmax_ce_fwd_kernel`` makes ONE pass over the tiles and keeps, in base 2, online running
    (max, sum) statistics per row and, for the symmetric loss, per column (plus, for ITC, the momentum
    row statistics and the soft targets' gap ``sum_j Pm_ij (max_i - t_ij)``). Each program owns a
    (row group x column split) rectangle, so row statistics are partial per split ``[splits, N]`` and
    column statistics partial per group ``[groups, M]``: O(N) memory for a bounded number of programs;
    a few torch ops merge them.
    The positives ``t_ii`` are read from the same tiles, and the loss is summed per row as
    ``(max - t_ii) + log2(sum)``, so no O(N s) sums cancel and a lone positive gives exactly 0 (fp32;
    fp16/bf16 share one exponential per logit between the row and column terms, see
    ``FACTORED_EXP_SPREAD``, and the backward does the same for its two softmaxes).
    ``_softmax_ce_bwd_kernel`` recomputes the tiles from the saved log-sum-exps and accumulates
    ``G' k`` for a block of rows and a slice of D (no atomics). It runs once with ``(q, k) = (a, b)``
    for ``da`` (and ``ds``) and once with ``(q, k) = (b, a)`` for ``db``: ``P_col`` of ``X`` is the
    row softmax of ``X^T``, so the same kernel serves both sides.
    ``_info_nce_fwd_grad_kernel`` serves a one-way ``info_nce`` whose ``a`` needs a gradient: in one
    pass over row blocks (FlashAttention's forward with ``V = b``) it keeps the online row statistics
    and ``sum_j exp2(t_ij - max_i) b_j``, rescaled as the running max moves, so the forward returns
    ``P b - b_pos`` (and the scale's sum) along with the loss. The backward then only scales it and
    runs ``_softmax_ce_bwd_kernel`` once for ``db``: one ``N M D`` product fewer than the statistics
    pass + two recompute launches (4 instead of 5 when one D slice covers D; each further slice
    recomputes the tiles, as it does in the backward). The symmetric loss cannot do the same without
    atomics: ``da`` needs the column softmax too, which is final only after the whole pass.

No N x N (or N x M) buffer is ever allocated; the extra memory is O(N) statistics, plus an fp32
``[splits, N, D]`` partial gradient only when a batch is too small to fill the GPU without splitting
the columns (a small batch against a long ITC queue; bounded, see ``_common.plan_backward``), and
for the one-way forward with the gradient the saved ``[N, D]`` ``P b - b_pos`` (fp32; fp64 for fp64).
"""
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _validation as V
from ._common import (LN2, LOG2E_C, NEG_BIG, _row_slice_program, _similarity_tiles, acc_dtype, autotuned,
                      check_matrix, check_same, check_scale, kernel_dtypes, launch, merge_partial_lse2,
                      padded_width, plan_backward, plan_forward, tile_config, tune_bucket)

# ------------------------------------------------------------------------------------ GPU configs
# sm_90 (H100/H200): 64-128 wide tiles, K slices of 32-128 staged through shared memory by the
# software pipeline (2-3 stages), 4-8 warps; fp16/bf16 products on tensor cores. The 64 x 64 config
# is the small-footprint fallback (fp32 products on FMA units, small batches). A 128 x 128 program
# of 8 warps holds a whole SM (255 registers), so its tensor cores idle while it takes a tile's
# exponentials; 128 x 64 on one warp group (4 warps: 251 registers, 72 KiB of shared memory, no
# spill) lets two programs share an SM and overlap one's exponentials with the other's product.
FORWARD_CONFIGS = [
    tile_config(128, 128, 64, 8, 3),
    tile_config(128, 128, 128, 8, 2),
    tile_config(128, 64, 64, 8, 3),
    tile_config(64, 64, 32, 4, 3),
    tile_config(128, 64, 64, 4, 3),
]

# The backward holds an fp32 [BLOCK_M, BLOCK_DO] slice of dq in registers (see _common): 64 x 256 is
# the no-spill workhorse, 64 x 512 trades a small spill for no tile recompute at D = 512, and the
# 128-row / 64 x 128 ones serve narrow D and fp32 (FMA) products. _common.prune_configs drops what
# would spill badly for the dtype.
# FLATTEN: Triton fuses the column-tile loop with the K loop inside it into one software-pipelined
# loop (tl.range(flatten=True)), so the next tile's first K slices load while this tile's softmax and
# G' k product run; otherwise the pipeline drains and refills at every tile, an L2 round trip exposed
# per ~1500 clocks of tensor work (64 x 64 tiles at D = 512). It buffers about twice the shared
# memory (sm_90 build table); the autotuner picks between both forms of the two D = 512 workhorses.
# 128 x 64 x 256 (flattened: 8 B of spill) reads 55 flops per operand byte from L2 at D = 512, against
# 38 for 64 x 64 x 256: the candidate for a backward that waits on L2 rather than on its arithmetic.
BACKWARD_CONFIGS = [
    tile_config(64, 64, 64, 8, 3, block_do=256, flatten=False),
    tile_config(64, 128, 64, 8, 2, block_do=256, flatten=False),
    tile_config(64, 64, 64, 8, 3, block_do=512, flatten=False),
    tile_config(128, 64, 64, 8, 3, block_do=128, flatten=False),
    tile_config(64, 64, 64, 8, 3, block_do=128, flatten=False),
    tile_config(64, 64, 32, 4, 3, block_do=128, flatten=False),
    tile_config(64, 64, 64, 8, 3, block_do=256, flatten=True),
    tile_config(64, 64, 64, 8, 3, block_do=512, flatten=True),
    tile_config(128, 64, 64, 8, 3, block_do=256, flatten=True),
]


# ------------------------------------------------------------------------ one exponential per logit
#: fp16/bf16 (``FACTOR_EXP``): the symmetric loss's two softmax terms of a logit share one
#: exponential. With one reference ``R`` per tile, ``2^(t_ij - r_i) = 2^(t_ij - R) 2^(R - r_i)`` and
#: ``2^(t_ij - c_j) = 2^(t_ij - R) 2^(R - c_j)``: ``BLOCK_M x BLOCK_N`` exponentials plus one per row
#: and column, instead of two per logit. The MUFU does ~16 exponentials per clock per SM against the
#: tensor cores' ~4096 flops, so at D = 512 two per logit cost about half as much as the product
#: itself (benchmarks/NOTES.md, "Reading the profile").
#: ``R`` bounds every logit of the tile (``2^(t - R) <= 1``), and the factored form is used while every
#: ``R - r_i`` and ``R - c_j`` is at most ``FACTOR_SPREAD``: a ``2^(t_ij - R)`` that flushes to 0 (GPU
#: exp2 flushes results below 2^-126; the interpreter keeps denormals, so the GPU tests are the ones
#: that see this) then stands for a term below ``2^(FACTOR_SPREAD - 126)`` = 2^-62, and no factor that
#: is used overflows. A tile whose statistics spread wider takes two exponentials per logit.
#: fp32/fp64 always take two, so that a lone positive's loss and gradient stay exactly 0 there (the
#: factors round; fp16/bf16 parity never relied on that).
FACTORED_EXP_SPREAD = 64.0


def factored_exp_args(dtype: torch.dtype) -> Dict[str, object]:
    """The ``FACTOR_EXP`` / ``FACTOR_SPREAD`` constexprs for an input dtype."""
    return {"FACTOR_EXP": dtype in (torch.float16, torch.bfloat16), "FACTOR_SPREAD": FACTORED_EXP_SPREAD}


@triton.jit
def _floor(ref, mask):
    """The smallest of ``ref`` where ``mask`` (a reference's farthest distance below ``R`` is ``R - floor``)."""
    return tl.min(tl.where(mask, ref, float("inf")), 0)


@triton.jit
def _exp2_gap(top, ref, mask):
    """``2^(top - ref)`` where ``mask``, 0 elsewhere."""
    return tl.exp2(tl.where(mask, top - ref, float("-inf")))


@triton.jit
def _row_and_col_exp2_sums_direct(t, row_ref, col_ref):
    """The two sums of :func:`_row_and_col_exp2_sums` with an exponential per term."""
    return tl.sum(tl.exp2(t - row_ref[:, None]), 1), tl.sum(tl.exp2(t - col_ref[None, :]), 0)


@triton.jit
def _row_and_col_exp2_sums(t, row_ref, col_ref, col_mask, FACTOR_EXP: tl.constexpr, FACTOR_SPREAD: tl.constexpr):
    """``(sum_j 2^(t_ij - row_ref_i), sum_i 2^(t_ij - col_ref_j))`` of one forward tile; the references
    are maxima (the running row maxima, the tile's column maxima), so no term exceeds 1. The sums of
    rows and columns outside the batch are meaningless (never stored)."""
    if FACTOR_EXP:
        top = tl.max(col_ref, 0)  # the tile's largest logit
        # rows past the batch have the reference NEG_BIG: a ragged row block takes two exponentials
        if top - tl.minimum(tl.min(row_ref, 0), _floor(col_ref, col_mask)) <= FACTOR_SPREAD:
            e = tl.exp2(t - top)
            row_sum = tl.sum(e, 1) * tl.exp2(top - row_ref)
            col_sum = tl.sum(e, 0) * _exp2_gap(top, col_ref, col_mask)
        else:
            row_sum, col_sum = _row_and_col_exp2_sums_direct(t, row_ref, col_ref)
    else:
        row_sum, col_sum = _row_and_col_exp2_sums_direct(t, row_ref, col_ref)
    return row_sum, col_sum


@triton.jit
def _own_plus_other_exp2_direct(t, own, other):
    """:func:`_own_plus_other_exp2` with an exponential per term."""
    return tl.exp2(t - own[:, None]) + tl.exp2(t - other[None, :])


@triton.jit
def _own_plus_other_exp2(t, own, other, own_top, own_factor, own_floor, col_mask,
                         FACTOR_EXP: tl.constexpr, FACTOR_SPREAD: tl.constexpr):
    """``2^(t_ij - own_i) + 2^(t_ij - other_j)`` of one backward tile (the symmetric loss's two
    softmaxes; the log-sum-exps are >= every logit). ``own_top`` and ``own_floor`` (the largest and
    smallest ``own_i`` of the valid rows) and ``own_factor = _exp2_gap(own_top, own, row_mask)`` are the
    program's, computed once."""
    if FACTOR_EXP:
        if own_top - tl.minimum(own_floor, _floor(other, col_mask)) <= FACTOR_SPREAD:
            g = tl.exp2(t - own_top) * (own_factor[:, None] + _exp2_gap(own_top, other, col_mask)[None, :])
        else:
            g = _own_plus_other_exp2_direct(t, own, other)
    else:
        g = _own_plus_other_exp2_direct(t, own, other)
    return g


# ------------------------------------------------------------------------------------ forward kernel
@triton.jit
def _softmax_ce_fwd_kernel(
    Q_ptr, QM_ptr, K_ptr, scale_ptr,
    row_max_ptr, row_sum_ptr,                  # [splits, N] partial row statistics
    soft_max_ptr, soft_sum_ptr, soft_gap_ptr,  # [splits, N] momentum-row statistics, sum Pm (max - t) (HAS_SOFT)
    col_max_ptr, col_sum_ptr,                  # [groups, M] partial column statistics (HAS_COL)
    diag_ptr,                                  # [N] t_ii = s log2(e) <q_i, k_(i + pos_off)>
    N, M, D, pos_off,                          # the positive of row i is column i + pos_off
    N_BUCKET, M_BUCKET,                        # autotune keys only (tune_bucket)
    stride_qn, stride_qd, stride_qmn, stride_qmd, stride_kn, stride_kd,
    rows_per_group, cols_per_split,
    D_PADDED: tl.constexpr, HAS_SOFT: tl.constexpr, HAS_COL: tl.constexpr,
    FACTOR_EXP: tl.constexpr, FACTOR_SPREAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = one (row group, column split) rectangle of ``t = s log2(e) q k^T``.

    Row statistics live in registers across the column tiles; column statistics are read, updated and
    written back per tile in ``col_*[group]``, which only this program touches.
    """
    pid_group = tl.program_id(0)
    pid_split = tl.program_id(1)
    scale_log2 = tl.load(scale_ptr).to(ACC_DTYPE) * LOG2E_C
    row_lo = pid_group * rows_per_group
    row_hi = tl.minimum(row_lo + rows_per_group, N)
    col_lo = pid_split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, M)

    for m0 in range(row_lo, row_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < row_hi
        m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
        l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
        mm_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
        lm_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
        w_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
        diag = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
        for n0 in range(col_lo, col_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < col_hi
            s, sm = _similarity_tiles(Q_ptr, QM_ptr, K_ptr, rows, cols, row_mask, col_mask, D,
                                      stride_qn, stride_qd, stride_qmn, stride_qmd, stride_kn, stride_kd,
                                      HAS_SOFT, BLOCK_M, BLOCK_N, BLOCK_K, ACC_DTYPE, DOT_PRECISION)
            valid = row_mask[:, None] & col_mask[None, :]
            t = tl.where(valid, s * scale_log2, NEG_BIG)
            if (n0 < m0 + pos_off + BLOCK_M) & (m0 + pos_off < n0 + BLOCK_N):
                # the positives t_ii, taken from the very tile values the statistics see, so
                # LSE_i - t_ii is exactly 0 when the positive is the only term
                # (int32 tile-local indices and one scalar shift: no extra int64 vectors in registers)
                shift = (m0 + pos_off - n0).to(tl.int32)
                hit = tl.arange(0, BLOCK_M)[:, None] + shift == tl.arange(0, BLOCK_N)[None, :]
                diag += tl.sum(tl.where(hit, t, 0.0), 1)
            # online log-sum-exp along the row (and, HAS_COL, down the column: merged below)
            m_new = tl.maximum(m_i, tl.max(t, 1))
            if HAS_COL:
                # the column sums are taken relative to the tile's own column maxima (the group's
                # running ones are loaded afterwards, keeping BLOCK_N-vectors out of this register peak)
                tile_col_max = tl.max(t, 0)
                row_sum, col_sum = _row_and_col_exp2_sums(t, m_new, tile_col_max, col_mask, FACTOR_EXP,
                                                          FACTOR_SPREAD)
            else:
                row_sum = tl.sum(tl.exp2(t - m_new[:, None]), 1)
            l_i = l_i * tl.exp2(m_i - m_new) + row_sum
            if HAS_SOFT:
                # momentum softmax Pm and the running gap sum_j Pm_ij (max_i - t_ij) >= 0, measured
                # from the running max of t (lifted by (new - old) sum Pm when it moves) and
                # rescaled with Pm's own max: a sum of Pm t from 0 would cancel against t_ii (both
                # about s log2 e) and lose the loss of a well-aligned batch
                tm = tl.where(valid, sm * scale_log2, NEG_BIG)
                mm_new = tl.maximum(mm_i, tl.max(tm, 1))
                pm = tl.exp2(tm - mm_new[:, None])
                rescale = tl.exp2(mm_i - mm_new)
                lift = (m_new - tl.where(lm_i > 0, m_i, m_new)) * lm_i  # lm_i = 0 while m_i = -inf
                w_i = (w_i + lift) * rescale + tl.sum(pm * tl.where(valid, m_new[:, None] - t, 0.0), 1)
                lm_i = lm_i * rescale + tl.sum(pm, 1)
                mm_i = mm_new
            m_i = m_new
            if HAS_COL:
                # online log-sum-exp down the column, merged into this group's partial (starting
                # fresh at the group's first row block makes re-running the kernel idempotent)
                col_off = pid_group.to(tl.int64) * M + cols
                carry = col_mask & (m0 > row_lo)
                c_max = tl.load(col_max_ptr + col_off, mask=carry, other=float("-inf"))
                c_sum = tl.load(col_sum_ptr + col_off, mask=carry, other=0.0)
                c_new = tl.maximum(c_max, tile_col_max)
                c_sum = c_sum * tl.exp2(c_max - c_new) + col_sum * tl.exp2(tile_col_max - c_new)
                tl.store(col_max_ptr + col_off, c_new, mask=col_mask)
                tl.store(col_sum_ptr + col_off, c_sum, mask=col_mask)
                # the next row block reloads these columns, possibly from other threads
                tl.debug_barrier()
        row_off = pid_split.to(tl.int64) * N + rows
        tl.store(row_max_ptr + row_off, m_i, mask=row_mask)
        tl.store(row_sum_ptr + row_off, l_i, mask=row_mask)
        if HAS_SOFT:
            tl.store(soft_max_ptr + row_off, mm_i, mask=row_mask)
            tl.store(soft_sum_ptr + row_off, lm_i, mask=row_mask)
            tl.store(soft_gap_ptr + row_off, w_i, mask=row_mask)
        # column i + pos_off (the positive of row i) lies in exactly one split: that program writes it
        pos = rows + pos_off
        tl.store(diag_ptr + rows, diag, mask=row_mask & (pos >= col_lo) & (pos < col_hi))


# ----------------------------------------------------------------------------------- backward kernel
@triton.jit
def _softmax_ce_bwd_kernel(
    Q_ptr, QM_ptr, K_ptr, scale_ptr, coef_ptr,
    own_lse_ptr,     # [N] base-2 LSE of q's rows (HAS_OWN)
    other_lse_ptr,   # [M] base-2 LSE indexed by k's rows (HAS_OTHER: the other side's softmax)
    soft_lse_ptr,    # [N] base-2 LSE of the momentum rows (HAS_SOFT)
    DQ_ptr,          # [splits, N, D] (or [N, D] with one split): coef * (G' k)
    ds_rows_ptr,     # [splits, N]: sum_j G'_ij <q_i, k_j> over the split's columns (COMPUTE_DS)
    alpha_ptr,       # [] ITC's distillation weight, in the accumulation dtype (a Python float
                     # argument would reach a compiled kernel as fp32, even for fp64 inputs)
    N, M, D, pos_off,  # the positive of row i is column i + pos_off (none when outside [0, M))
    N_BUCKET, M_BUCKET,  # autotune keys only (tune_bucket)
    stride_qn, stride_qd, stride_qmn, stride_qmd, stride_kn, stride_kd,
    stride_dqs, stride_dqn, stride_dqd,
    cols_per_split,
    D_PADDED: tl.constexpr, HAS_OWN: tl.constexpr, HAS_OTHER: tl.constexpr, HAS_SOFT: tl.constexpr,
    COMPUTE_DS: tl.constexpr, FACTOR_EXP: tl.constexpr, FACTOR_SPREAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    FLATTEN: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``G'_ij = [2^(t_ij - own_i)] + [2^(t_ij - other_j)] - [alpha 2^(tm_ij - soft_i)] - c d_ij`` with
    ``c = [1] + [1] - [alpha]``: each softmax term comes with its one-hot target, and the soft targets
    take ``alpha`` of it (ITC). One program accumulates ``(G' k)[rows, D slice]`` over the columns of
    its split."""
    pid_m = tl.program_id(0)
    pid_do = tl.program_id(1)
    pid_split = tl.program_id(2)
    rows, row_mask, outs, out_mask, col_lo, col_hi = _row_slice_program(N, M, D, cols_per_split,
                                                                        BLOCK_M, BLOCK_DO)
    scale_log2 = tl.load(scale_ptr).to(ACC_DTYPE) * LOG2E_C
    alpha = tl.load(alpha_ptr).to(ACC_DTYPE)
    # computed here, in the same arithmetic as g, so that c - g_ii is exactly 0 when g_ii = c (when the
    # recomputed tile reproduces the forward's bits: always for fp32/fp64, whose products add the
    # D terms in order; for fp16/bf16 it depends on the tensor-core instruction and is not relied on)
    diag_coef = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    if HAS_OWN:
        diag_coef += 1.0
    if HAS_OTHER:
        diag_coef += 1.0
    if HAS_SOFT:
        diag_coef -= alpha
    if HAS_OWN:
        own = tl.load(own_lse_ptr + rows, mask=row_mask, other=0.0)
        if HAS_OTHER:
            own_top = tl.max(tl.where(row_mask, own, float("-inf")), 0)
            own_floor = _floor(own, row_mask)
            own_factor = _exp2_gap(own_top, own, row_mask)
    if HAS_SOFT:
        soft = tl.load(soft_lse_ptr + rows, mask=row_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC_DTYPE)
    ds_row = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for n0 in tl.range(col_lo, col_hi, BLOCK_N, flatten=FLATTEN):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < col_hi
        s, sm = _similarity_tiles(Q_ptr, QM_ptr, K_ptr, rows, cols, row_mask, col_mask, D,
                                  stride_qn, stride_qd, stride_qmn, stride_qmd, stride_kn, stride_kd,
                                  HAS_SOFT, BLOCK_M, BLOCK_N, BLOCK_K, ACC_DTYPE, DOT_PRECISION)
        t = tl.where(col_mask[None, :], s * scale_log2, NEG_BIG)
        g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        if HAS_OTHER:
            other = tl.load(other_lse_ptr + cols, mask=col_mask, other=0.0)
            if HAS_OWN:
                g += _own_plus_other_exp2(t, own, other, own_top, own_factor, own_floor, col_mask, FACTOR_EXP,
                                          FACTOR_SPREAD)
            else:
                g += tl.exp2(t - other[None, :])
        elif HAS_OWN:
            g += tl.exp2(t - own[:, None])
        if HAS_SOFT:
            tm = tl.where(col_mask[None, :], sm * scale_log2, NEG_BIG)
            g -= alpha * tl.exp2(tm - soft[:, None])
        if (n0 < pid_m * BLOCK_M + pos_off + BLOCK_M) & (pid_m * BLOCK_M + pos_off < n0 + BLOCK_N):
            # the positives' one-hot, subtracted in fp32 before the dot rounds G' to the input dtype:
            # on a well-aligned batch g_ii is c - eps with eps far below fp16's step at c, and
            # rounding g_ii first would leave the gradient mostly rounding residue
            shift = (pid_m * BLOCK_M + pos_off - n0).to(tl.int32)
            hit = (tl.arange(0, BLOCK_M)[:, None] + shift == tl.arange(0, BLOCK_N)[None, :]) & col_mask[None, :]
            g = tl.where(hit, g - diag_coef[:, None], g)
        if COMPUTE_DS:
            # sum_j G'_ij <q_i, k_j> in fp32 from the unrounded tiles, from the same tile values as
            # the rest of the row
            ds_row += tl.sum(g * s, 1)
        k_out = tl.load(K_ptr + cols[:, None] * stride_kn + outs[None, :] * stride_kd,
                        mask=col_mask[:, None] & out_mask[None, :], other=0.0)
        # G' enters the tensor cores unscaled (|G'| <= 2): no fp16 underflow of w = 1/N.
        acc = tl.dot(g.to(k_out.dtype), k_out, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    if COMPUTE_DS:
        # every D slice saw the same tiles: the first one reports
        tl.store(ds_rows_ptr + pid_split.to(tl.int64) * N + rows, ds_row, mask=row_mask & (pid_do == 0))
    coef = tl.load(coef_ptr).to(ACC_DTYPE)
    dq_ptrs = DQ_ptr + pid_split.to(tl.int64) * stride_dqs + rows[:, None] * stride_dqn + outs[None, :] * stride_dqd
    tl.store(dq_ptrs, (acc * coef).to(DQ_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])


# ------------------------------------------------------------------ one-way forward with the gradient
@triton.jit
def _info_nce_fwd_grad_kernel(
    Q_ptr, K_ptr, scale_ptr,
    part_max_ptr, part_sum_ptr, part_dot_ptr,  # [splits, N]: running max, sum exp2(t - max), sum exp2(t - max) s
    diag2_ptr, diag_raw_ptr,                   # [N]: t_ii and s_ii = <q_i, k_(i + pos_off)> from the tiles
    ACC_ptr,                                   # [splits, N, D] fp32/fp64: sum_j exp2(t_ij - max_i) k_j
    N, M, D, pos_off,
    N_BUCKET, M_BUCKET,                        # autotune keys only (tune_bucket)
    stride_qn, stride_qd, stride_kn, stride_kd,
    stride_as, stride_an, stride_ad,
    cols_per_split,
    D_PADDED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    FLATTEN: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One-way ``CE(s q k^T)`` and ``P k`` in one pass: FlashAttention's forward with ``V = k``.

    A program owns a block of rows, a slice of D and a column split, and keeps the online row
    statistics and ``sum_j exp2(t_ij - max_i) k_j`` (rescaled when the running max moves), plus
    ``sum_j exp2(t_ij - max_i) s_ij`` for the scale's gradient. Every D slice sees the same tiles; the
    first one reports the statistics."""
    pid_m = tl.program_id(0)
    pid_do = tl.program_id(1)
    pid_split = tl.program_id(2)
    rows, row_mask, outs, out_mask, col_lo, col_hi = _row_slice_program(N, M, D, cols_per_split,
                                                                        BLOCK_M, BLOCK_DO)
    scale_log2 = tl.load(scale_ptr).to(ACC_DTYPE) * LOG2E_C

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    w_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    diag2 = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    diag_raw = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC_DTYPE)
    for n0 in tl.range(col_lo, col_hi, BLOCK_N, flatten=FLATTEN):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < col_hi
        s, _ = _similarity_tiles(Q_ptr, Q_ptr, K_ptr, rows, cols, row_mask, col_mask, D,
                                 stride_qn, stride_qd, stride_qn, stride_qd, stride_kn, stride_kd,
                                 False, BLOCK_M, BLOCK_N, BLOCK_K, ACC_DTYPE, DOT_PRECISION)
        t = tl.where(col_mask[None, :], s * scale_log2, NEG_BIG)
        if (n0 < pid_m * BLOCK_M + pos_off + BLOCK_M) & (pid_m * BLOCK_M + pos_off < n0 + BLOCK_N):
            shift = (pid_m * BLOCK_M + pos_off - n0).to(tl.int32)
            hit = tl.arange(0, BLOCK_M)[:, None] + shift == tl.arange(0, BLOCK_N)[None, :]
            diag2 += tl.sum(tl.where(hit, t, 0.0), 1)
            diag_raw += tl.sum(tl.where(hit, s, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(t, 1))
        rescale = tl.exp2(m_i - m_new)
        p = tl.exp2(t - m_new[:, None])
        l_i = l_i * rescale + tl.sum(p, 1)
        w_i = w_i * rescale + tl.sum(p * s, 1)  # masked columns: p = 0 and s = 0
        m_i = m_new
        k_out = tl.load(K_ptr + cols[:, None] * stride_kn + outs[None, :] * stride_kd,
                        mask=col_mask[:, None] & out_mask[None, :], other=0.0)
        # p in [0, 1] enters the tensor cores in the input dtype, as G' does in the backward
        acc = tl.dot(p.to(k_out.dtype), k_out, acc * rescale[:, None], input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)

    report = row_mask & (pid_do == 0)
    row_off = pid_split.to(tl.int64) * N + rows
    tl.store(part_max_ptr + row_off, m_i, mask=report)
    tl.store(part_sum_ptr + row_off, l_i, mask=report)
    tl.store(part_dot_ptr + row_off, w_i, mask=report)
    pos = rows + pos_off
    holds_pos = report & (pos >= col_lo) & (pos < col_hi)
    tl.store(diag2_ptr + rows, diag2, mask=holds_pos)
    tl.store(diag_raw_ptr + rows, diag_raw, mask=holds_pos)
    acc_ptrs = ACC_ptr + pid_split.to(tl.int64) * stride_as + rows[:, None] * stride_an + outs[None, :] * stride_ad
    tl.store(acc_ptrs, acc, mask=row_mask[:, None] & out_mask[None, :])


# Tuned per shape (N and M bucketed, the padded D), so a small warm-up batch does not fix the config of the real one.
_softmax_ce_fwd_tuned = autotuned(FORWARD_CONFIGS, ["N_BUCKET", "M_BUCKET", "D_PADDED", "HAS_SOFT", "HAS_COL"])(
    _softmax_ce_fwd_kernel)
_softmax_ce_bwd_tuned = autotuned(BACKWARD_CONFIGS, ["N_BUCKET", "M_BUCKET", "D_PADDED", "HAS_OWN", "HAS_OTHER",
                                                     "HAS_SOFT", "COMPUTE_DS"])(_softmax_ce_bwd_kernel)
# Same register budget as the backward (an fp32 [BLOCK_M, BLOCK_DO] accumulator): same configs.
_info_nce_fwd_grad_tuned = autotuned(BACKWARD_CONFIGS, ["N_BUCKET", "M_BUCKET", "D_PADDED"])(_info_nce_fwd_grad_kernel)


# ------------------------------------------------------------------------------------------ launchers
def softmax_ce_forward(q: Tensor, k: Tensor, scale: Tensor, *, q_m: Optional[Tensor] = None,
                       with_col_stats: bool = False, pos_off: int = 0,
                       config: Optional[triton.Config] = None) -> Dict[str, Tensor]:
    """One pass over the tiles of ``t = s log2(e) q k^T`` (base-2 logits). Returns, per row of ``q``:
    ``row_lse2 = log2 sum_j exp2 t_ij`` and ``row_excess2 = row_lse2 - t_ii`` (computed without
    cancellation; the positive ``t_ii`` is at column ``i + pos_off``), and with ``q_m``: ``soft_lse2`` (of ``t^m = s log2(e) q_m k^T``) and
    ``soft_excess2 = sum_j softmax(t^m)_ij t_ij - t_ii``; with ``with_col_stats``: ``col_lse2`` and
    ``col_excess2`` per column ``j < N`` (positives ``t_jj``)."""
    n, d = q.shape
    m = k.shape[0]
    acc = acc_dtype(q.dtype)
    plan = plan_forward(n, m, q.device, with_col_stats)
    splits, groups = plan["splits"], plan["groups"]
    new = dict(dtype=acc, device=q.device)
    row_max, row_sum = torch.empty((splits, n), **new), torch.empty((splits, n), **new)
    has_soft = q_m is not None
    soft = [torch.empty((splits, n), **new) for _ in range(3)] if has_soft else [row_max] * 3
    cols = [torch.empty((groups, m), **new) for _ in range(2)] if with_col_stats else [row_max] * 2
    diag2 = torch.empty((n,), **new)
    q_m_arg = q_m if has_soft else q
    args = dict(
        Q_ptr=q, QM_ptr=q_m_arg, K_ptr=k, scale_ptr=scale,
        row_max_ptr=row_max, row_sum_ptr=row_sum,
        soft_max_ptr=soft[0], soft_sum_ptr=soft[1], soft_gap_ptr=soft[2],
        col_max_ptr=cols[0], col_sum_ptr=cols[1], diag_ptr=diag2,
        N=n, M=m, D=d, pos_off=pos_off, N_BUCKET=tune_bucket(n), M_BUCKET=tune_bucket(m),
        stride_qn=q.stride(0), stride_qd=q.stride(1), stride_qmn=q_m_arg.stride(0),
        stride_qmd=q_m_arg.stride(1), stride_kn=k.stride(0), stride_kd=k.stride(1),
        rows_per_group=plan["rows_per_group"], cols_per_split=plan["cols_per_split"],
        D_PADDED=padded_width(d), HAS_SOFT=has_soft, HAS_COL=with_col_stats, **factored_exp_args(q.dtype),
        **kernel_dtypes(q.dtype),
    )
    launch(_softmax_ce_fwd_kernel, _softmax_ce_fwd_tuned, (groups, splits), args, config)
    top, log2_sum = merge_partial_lse2(row_max, row_sum)
    out = {"row_lse2": top + log2_sum, "row_excess2": (top - diag2) + log2_sum}
    if with_col_stats:
        top, log2_sum = merge_partial_lse2(cols[0], cols[1])
        out["col_lse2"] = top + log2_sum
        out["col_excess2"] = (top[:n] - diag2) + log2_sum[:n]
    if has_soft:
        top = soft[0].amax(0)
        rescale = torch.exp2(soft[0] - top)
        total = (soft[1] * rescale).sum(0)
        out["soft_lse2"] = top + torch.log2(total)
        # each split's gap is measured from its own max of t: lift it to the row's
        t_top = row_max.amax(0)
        gap = ((soft[2] + (t_top - row_max) * soft[1]) * rescale).sum(0)
        # sum_j Pm_ij t_ij - t_ii = (max_i - t_ii) - sum_j Pm_ij (max_i - t_ij)
        out["soft_excess2"] = (t_top - diag2) - gap / total
    return out


def softmax_ce_backward(q: Tensor, k: Tensor, scale: Tensor, coef: Tensor, *,
                        own_lse2: Optional[Tensor] = None, other_lse2: Optional[Tensor] = None,
                        q_m: Optional[Tensor] = None, soft_lse2: Optional[Tensor] = None, alpha: float = 0.0,
                        pos_off: int = 0, compute_ds: bool = False, config: Optional[triton.Config] = None
                        ) -> Tuple[Tensor, Optional[Tensor]]:
    """``coef * (G' k)`` in ``q``'s dtype and, with ``compute_ds``, ``sum_ij G'_ij <q_i, k_j>`` (a 0-dim
    device tensor, fp32/fp64). ``G'`` is built from the terms whose statistics are given; the one-hot
    target of row ``i`` is column ``i + pos_off`` (none when that is outside ``[0, M)``)."""
    n, d = q.shape
    m = k.shape[0]
    acc = acc_dtype(q.dtype)
    plan = plan_backward(n, m, d, q.device)
    splits = plan["splits"]
    if splits == 1:
        dq = torch.empty((n, d), dtype=q.dtype, device=q.device)
        dq_strides = (0, dq.stride(0), dq.stride(1))
    else:
        dq = torch.empty((splits, n, d), dtype=acc, device=q.device)
        dq_strides = dq.stride()
    ds_rows = torch.empty((splits, n), dtype=acc, device=q.device) if compute_ds else coef
    has_soft = soft_lse2 is not None
    q_m_arg = q_m if has_soft else q
    any_stat = own_lse2 if own_lse2 is not None else other_lse2
    args = dict(
        Q_ptr=q, QM_ptr=q_m_arg, K_ptr=k, scale_ptr=scale, coef_ptr=coef,
        own_lse_ptr=own_lse2 if own_lse2 is not None else any_stat,
        other_lse_ptr=other_lse2 if other_lse2 is not None else any_stat,
        soft_lse_ptr=soft_lse2 if has_soft else any_stat,
        DQ_ptr=dq, ds_rows_ptr=ds_rows,
        alpha_ptr=torch.full((), float(alpha), dtype=acc, device=q.device),
        N=n, M=m, D=d, pos_off=pos_off, N_BUCKET=tune_bucket(n), M_BUCKET=tune_bucket(m),
        stride_qn=q.stride(0), stride_qd=q.stride(1), stride_qmn=q_m_arg.stride(0),
        stride_qmd=q_m_arg.stride(1), stride_kn=k.stride(0), stride_kd=k.stride(1),
        stride_dqs=dq_strides[0], stride_dqn=dq_strides[1], stride_dqd=dq_strides[2],
        cols_per_split=plan["cols_per_split"],
        D_PADDED=padded_width(d), HAS_OWN=own_lse2 is not None, HAS_OTHER=other_lse2 is not None,
        HAS_SOFT=has_soft, COMPUTE_DS=compute_ds, **factored_exp_args(q.dtype), **kernel_dtypes(q.dtype),
    )
    launch(_softmax_ce_bwd_kernel, _softmax_ce_bwd_tuned,
           lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_DO"]), splits), args, config)
    if splits > 1:
        dq = dq.sum(0).to(q.dtype)
    return dq, (ds_rows.sum() if compute_ds else None)


# ------------------------------------------------------------------------- info_nce: forward/backward
def info_nce_forward(a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, offset: int = 0,
                     config: Optional[triton.Config] = None) -> Tuple[Tensor, Tensor]:
    """Loss (0-dim, fp32; fp64 for fp64 inputs) and the saved base-2 LSEs ``[1 or 2, N]`` (rows of
    ``s a b^T``, then its columns when symmetric). One-way, ``b`` may be ``[M, D]`` with the positives
    at column ``offset + i``."""
    n = a.shape[0]
    stats = softmax_ce_forward(a, b, scale, with_col_stats=symmetric, pos_off=offset, config=config)
    loss = stats["row_excess2"].sum() * LN2
    if not symmetric:
        return loss / n, stats["row_lse2"][None]
    loss = (loss + stats["col_excess2"].sum() * LN2) / (2 * n)
    return loss, torch.stack([stats["row_lse2"], stats["col_lse2"]])


def info_nce_backward(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, lse2: Tensor, symmetric: bool,
                      needs_a: bool, needs_b: bool, needs_scale: bool, offset: int = 0,
                      config: Optional[triton.Config] = None) -> Tuple[Optional[Tensor], ...]:
    """``(da, db, dscale)``, ``None`` where not needed. Two launches: rows of ``a`` (da, dscale) and
    rows of ``b`` (db)."""
    n = a.shape[0]
    acc = acc_dtype(a.dtype)
    weight = 1.0 / (2 * n) if symmetric else 1.0 / n
    g = grad.to(acc).reshape(())
    coef = g * scale.to(acc) * weight
    row_lse2 = lse2[0]
    col_lse2 = lse2[1] if symmetric else None
    da = db = dscale = None
    if needs_a or needs_scale:
        da, ds_sum = softmax_ce_backward(a, b, scale, coef, own_lse2=row_lse2, other_lse2=col_lse2,
                                         pos_off=offset, compute_ds=needs_scale, config=config)
        if needs_scale:
            dscale = (g * weight * ds_sum).to(scale.dtype)
    if needs_b:
        # rows of X^T: the column softmax is b's own; the row softmax of X is indexed by b's columns;
        # row j of b is the positive of row j - offset of a (rows outside a's range have none)
        db, _ = softmax_ce_backward(b, a, scale, coef, own_lse2=col_lse2, other_lse2=row_lse2,
                                    pos_off=-offset, config=config)
    return (da if needs_a else None), db, dscale


def info_nce_forward_with_grad(a: Tensor, b: Tensor, scale: Tensor, offset: int = 0,
                               config: Optional[triton.Config] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One-way ``CE(s a b^T)`` with ``a``'s gradient formed in the same pass (no recompute later).

    Returns the loss, the saved base-2 row LSEs ``[1, N]`` (for ``db``), ``H b = P b - b_pos``
    (``dL/da = g s / N * H b``; in the accumulation dtype, so the gradient is rounded to ``a``'s dtype
    once, after scaling)
    and ``sum_ij H_ij <a_i, b_j>`` (``dL/ds = g / N * that``), with ``H = P_row - I`` shifted by
    ``offset``."""
    n, d = a.shape
    m = b.shape[0]
    acc = acc_dtype(a.dtype)
    plan = plan_backward(n, m, d, a.device)
    splits = plan["splits"]
    new = dict(dtype=acc, device=a.device)
    part_max, part_sum, part_dot = (torch.empty((splits, n), **new) for _ in range(3))
    diag2, diag_raw = torch.empty((n,), **new), torch.empty((n,), **new)
    accum = torch.empty((splits, n, d), **new)
    args = dict(
        Q_ptr=a, K_ptr=b, scale_ptr=scale,
        part_max_ptr=part_max, part_sum_ptr=part_sum, part_dot_ptr=part_dot,
        diag2_ptr=diag2, diag_raw_ptr=diag_raw, ACC_ptr=accum,
        N=n, M=m, D=d, pos_off=offset, N_BUCKET=tune_bucket(n), M_BUCKET=tune_bucket(m),
        stride_qn=a.stride(0), stride_qd=a.stride(1), stride_kn=b.stride(0), stride_kd=b.stride(1),
        stride_as=accum.stride(0), stride_an=accum.stride(1), stride_ad=accum.stride(2),
        cols_per_split=plan["cols_per_split"],
        D_PADDED=padded_width(d), **kernel_dtypes(a.dtype),
    )
    launch(_info_nce_fwd_grad_kernel, _info_nce_fwd_grad_tuned,
           lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_DO"]), splits), args, config)
    if splits == 1:
        top, total, dot, accum = part_max[0], part_sum[0], part_dot[0], accum[0]
    else:  # merge the column splits' partials, each relative to its own running max
        top = part_max.amax(0)
        rescale = torch.exp2(part_max - top)
        total, dot = (part_sum * rescale).sum(0), (part_dot * rescale).sum(0)
        accum = (accum * rescale[:, :, None]).sum(0)
    log2_total = torch.log2(total)
    loss = ((top - diag2) + log2_total).sum() * LN2 / n
    h_b = accum.div_(total[:, None]).sub_(b[offset:offset + n])
    h_dot = (dot / total - diag_raw).sum()
    return loss, (top + log2_total)[None], h_b, h_dot


# ---------------------------------------------------------------------- itc_soft_ce: forward/backward
def itc_forward(q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, alpha: float,
                config: Optional[triton.Config] = None) -> Tuple[Tensor, Tensor]:
    """Loss and the saved base-2 LSEs ``[2, N]`` (rows of ``s q bank^T``, rows of ``s q_m bank^T``;
    the second is 0 when ``alpha == 0``: no soft targets, ``q_m`` is not read)."""
    n = q.shape[0]
    soft = alpha > 0.0
    stats = softmax_ce_forward(q, bank, scale, q_m=q_m if soft else None, config=config)
    # -sum_j Y_ij log P_ij = (LSE_i - X_ii) - alpha (sum_j Pm_ij X_ij - X_ii), in base 2 until here
    row_loss = stats["row_excess2"]
    if soft:
        row_loss = row_loss - alpha * stats["soft_excess2"]
        saved = torch.stack([stats["row_lse2"], stats["soft_lse2"]])
    else:
        saved = torch.stack([stats["row_lse2"], torch.zeros_like(stats["row_lse2"])])
    return row_loss.sum() * LN2 / n, saved


def itc_backward(grad: Tensor, q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, lse2: Tensor, alpha: float,
                 needs_q: bool, needs_scale: bool,
                 config: Optional[triton.Config] = None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(dq, dscale)``, ``None`` where not needed."""
    if not (needs_q or needs_scale):
        return None, None
    n = q.shape[0]
    acc = acc_dtype(q.dtype)
    g = grad.to(acc).reshape(())
    coef = g * scale.to(acc) / n
    soft = alpha > 0.0
    dq, ds_sum = softmax_ce_backward(q, bank, scale, coef, own_lse2=lse2[0],
                                     q_m=q_m if soft else None, soft_lse2=lse2[1] if soft else None,
                                     alpha=alpha, compute_ds=needs_scale, config=config)
    dscale = (g / n * ds_sum).to(scale.dtype) if needs_scale else None
    return (dq if needs_q else None), dscale


# ------------------------------------------------------------------------------ custom ops + autograd
# torch.library custom ops make both primitives opaque to torch.compile (no graph break): the fake
# impls give shapes only; the forward op also returns the saved statistics so the backward op never
# recomputes them. The backward ops return empty tensors for gradients nobody asked for.

@torch.library.custom_op("lsr_kernels::triton_info_nce", mutates_args=())
def _info_nce_op(a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, offset: int) -> Tuple[Tensor, Tensor]:
    return info_nce_forward(a, b, scale, symmetric, offset)


@_info_nce_op.register_fake
def _info_nce_fake(a, b, scale, symmetric, offset):
    acc = acc_dtype(a.dtype)
    return a.new_empty((), dtype=acc), a.new_empty((2 if symmetric else 1, a.shape[0]), dtype=acc)


@torch.library.custom_op("lsr_kernels::triton_info_nce_backward", mutates_args=())
def _info_nce_backward_op(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, lse2: Tensor, symmetric: bool,
                          offset: int, needs_a: bool, needs_b: bool, needs_scale: bool
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    da, db, dscale = info_nce_backward(grad, a, b, scale, lse2, symmetric, needs_a, needs_b, needs_scale, offset)
    return (da if da is not None else a.new_empty(0), db if db is not None else b.new_empty(0),
            dscale if dscale is not None else scale.new_empty(0))


@_info_nce_backward_op.register_fake
def _info_nce_backward_fake(grad, a, b, scale, lse2, symmetric, offset, needs_a, needs_b, needs_scale):
    return (a.new_empty(a.shape) if needs_a else a.new_empty(0), b.new_empty(b.shape) if needs_b else b.new_empty(0),
            scale.new_empty(()) if needs_scale else scale.new_empty(0))


def _info_nce_setup(ctx, inputs, output):
    a, b, scale, symmetric, offset = inputs
    ctx.save_for_backward(a, b, scale, output[1])
    ctx.symmetric, ctx.offset = symmetric, offset


def _info_nce_grad(ctx, grad_loss, _grad_lse2):
    V.refuse_double_backward("triton", "info_nce")
    a, b, scale, lse2 = ctx.saved_tensors
    needs_a, needs_b, needs_scale = ctx.needs_input_grad[:3]
    da, db, dscale = _info_nce_backward_op(grad_loss, a, b, scale, lse2, ctx.symmetric, ctx.offset,
                                           needs_a, needs_b, needs_scale)
    return (da if needs_a else None), (db if needs_b else None), (dscale if needs_scale else None), None, None


_info_nce_op.register_autograd(_info_nce_grad, setup_context=_info_nce_setup)


@torch.library.custom_op("lsr_kernels::triton_info_nce_with_grad", mutates_args=())
def _info_nce_with_grad_op(a: Tensor, b: Tensor, scale: Tensor, offset: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return info_nce_forward_with_grad(a, b, scale, offset)


@_info_nce_with_grad_op.register_fake
def _info_nce_with_grad_fake(a, b, scale, offset):
    acc = acc_dtype(a.dtype)
    return (a.new_empty((), dtype=acc), a.new_empty((1, a.shape[0]), dtype=acc), a.new_empty(a.shape, dtype=acc),
            a.new_empty((), dtype=acc))


def _info_nce_with_grad_setup(ctx, inputs, output):
    a, b, scale, offset = inputs
    _, lse2, h_b, h_dot = output
    ctx.save_for_backward(a, b, scale, lse2, h_b, h_dot)
    ctx.offset = offset


def _info_nce_with_grad_grad(ctx, grad_loss, _grad_lse2, _grad_h_b, _grad_h_dot):
    V.refuse_double_backward("triton", "info_nce")
    a, b, scale, lse2, h_b, h_dot = ctx.saved_tensors
    needs_a, needs_b, needs_scale = ctx.needs_input_grad[:3]
    n = a.shape[0]
    acc = acc_dtype(a.dtype)
    g = grad_loss.to(acc).reshape(())
    da = db = dscale = None
    if needs_a:
        da = (h_b * (g * scale.to(acc) / n)).to(a.dtype)
    if needs_scale:
        dscale = (g / n * h_dot).to(scale.dtype)
    if needs_b:
        db = _info_nce_backward_op(grad_loss, a, b, scale, lse2, False, ctx.offset, False, True, False)[1]
    return da, db, dscale, None


_info_nce_with_grad_op.register_autograd(_info_nce_with_grad_grad, setup_context=_info_nce_with_grad_setup)


@torch.library.custom_op("lsr_kernels::triton_itc_soft_ce", mutates_args=())
def _itc_op(q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, alpha: float) -> Tuple[Tensor, Tensor]:
    return itc_forward(q, q_m, bank, scale, alpha)


@_itc_op.register_fake
def _itc_fake(q, q_m, bank, scale, alpha):
    acc = acc_dtype(q.dtype)
    return q.new_empty((), dtype=acc), q.new_empty((2, q.shape[0]), dtype=acc)


@torch.library.custom_op("lsr_kernels::triton_itc_soft_ce_backward", mutates_args=())
def _itc_backward_op(grad: Tensor, q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, lse2: Tensor,
                     alpha: float, needs_q: bool, needs_scale: bool) -> Tuple[Tensor, Tensor]:
    dq, dscale = itc_backward(grad, q, q_m, bank, scale, lse2, alpha, needs_q, needs_scale)
    return (dq if dq is not None else q.new_empty(0)), (dscale if dscale is not None else scale.new_empty(0))


@_itc_backward_op.register_fake
def _itc_backward_fake(grad, q, q_m, bank, scale, lse2, alpha, needs_q, needs_scale):
    return (q.new_empty(q.shape) if needs_q else q.new_empty(0)), (scale.new_empty(()) if needs_scale else scale.new_empty(0))


def _itc_setup(ctx, inputs, output):
    q, q_m, bank, scale, alpha = inputs
    ctx.save_for_backward(q, q_m, bank, scale, output[1])
    ctx.alpha = alpha


def _itc_grad(ctx, grad_loss, _grad_lse2):
    V.refuse_double_backward("triton", "itc_soft_ce")
    q, q_m, bank, scale, lse2 = ctx.saved_tensors
    needs_q, needs_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dq, dscale = _itc_backward_op(grad_loss, q, q_m, bank, scale, lse2, ctx.alpha, needs_q, needs_scale)
    # the soft targets are constants (ALBEF computes them under no_grad): no gradient for q_m, bank
    return (dq if needs_q else None), None, None, (dscale if needs_scale else None), None


_itc_op.register_autograd(_itc_grad, setup_context=_itc_setup)


# -------------------------------------------------------------------------------------- primitives
def info_nce(a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, offset: int = 0) -> Tensor:
    """``CE(s a b^T)``, or ``(CE(s a b^T) + CE(s b a^T)) / 2`` when ``symmetric`` (both from one pass);
    one-way with a rectangular ``b`` and the positives at ``offset`` (contract in lsr_kernels.backends)."""
    check_matrix("a", a)
    check_matrix("b", b)
    check_same("b", b, "a", a, same_rows=False)
    offset = V.check_info_nce_operands(a, b, symmetric, offset)
    scale = check_scale(scale, a)
    if not symmetric and a.requires_grad and torch.is_grad_enabled():
        # a's gradient is to come: form it in the forward pass (4 N M D products in all instead of 5)
        return _info_nce_with_grad_op(a, b, scale, offset)[0]
    return _info_nce_op(a, b, scale, bool(symmetric), offset)[0]


def itc_soft_ce(q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, alpha: float) -> Tensor:
    """``-(1/N) sum_ij Y_ij log softmax(s q bank^T)_ij``, ``Y = alpha softmax(s q_m bank^T) + (1 - alpha) I``."""
    check_matrix("q", q)
    check_matrix("q_m", q_m)
    check_matrix("bank", bank)
    check_same("q_m", q_m, "q", q, same_rows=True)
    check_same("bank", bank, "q", q, same_rows=False)
    if bank.shape[0] < q.shape[0]:
        raise ValueError(f"bank: expected at least N = {q.shape[0]} rows (its first N rows are the positives), "
                         f"got shape {tuple(bank.shape)}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    scale = check_scale(scale, q)
    return _itc_op(q, q_m, bank, scale, alpha)[0]
