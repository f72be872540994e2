"""Softmax statistics of similarity tiles for the pure-PyTorch paths (the ``chunked`` backend and the
distributed engine of :mod:`lsr_kernels.distributed`).

A row's loss ``lse_i - X_i,pos`` is the difference of two numbers of the logit scale's size: formed as
``(max_i - X_i,pos) + log sum_j exp(X_ij - max_i)`` from statistics kept apart, it is as accurate as
the loss itself and never negative. (Kept free of torch._dynamo, which the chunked backend imports,
so that ``import lsr_kernels`` stays light.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

#: Floors for the arguments of exp (see :func:`exp_`); fp16/bf16 never reach exp (statistics are fp32).
EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def exp_(x: Tensor) -> Tensor:
    """``exp`` in place, arguments floored where the result stays a normal number.

    Every exp here is of a shifted logit (``<= 0`` up to rounding) and feeds a sum that contains a
    term near 1, so a floor of -80 (fp32; exp(-80) ~ 2e-35) or -700 (fp64) changes no result at the
    working precision. It matters for speed: PyTorch's vectorised CPU exp leaves its fast path for
    arguments whose exp underflows (30-100 ns instead of ~2 ns per element), which is most of a
    tile once ``s`` has grown to CLIP's 100.
    """
    return x.clamp_(min=EXP_FLOOR[x.dtype]).exp_()


def sub_max_(x: Tensor, dim: int, scratch: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(top, x - top)``: the max along ``dim`` and ``x`` shifted by it, in place (or into ``scratch``,
    same shape and contiguous, keeping ``x``)."""
    top = x.amax(dim, keepdim=True)
    top.masked_fill_(top.isinf(), 0.0)  # all -inf stays -inf, any +inf gives +inf: no nan
    return top.squeeze(dim), (x.sub_(top) if scratch is None else torch.sub(x, top, out=scratch))


def exp_sums(x: Tensor, dim: int, scratch: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(top, total)``: the max of ``x`` along ``dim`` and ``sum exp(x - top)``, kept apart so that a
    loss ``log(total) + (top - x_pos)`` never subtracts two numbers of the logits' size (``top + log
    total`` rounds ``log total`` to the precision of ``s``: a loss near 0 came out negative).
    ``scratch`` (same shape, contiguous) keeps ``x``; without it ``x`` is overwritten (its last use)."""
    top, shifted = sub_max_(x, dim, scratch)
    return top, exp_(shifted).sum(dim)


def merge_exp_sums(top: Tensor, total: Tensor, new_top: Tensor, new_total: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge two ``(top, total)`` statistics of :func:`exp_sums` (``(-inf, 0)`` is the empty one)."""
    merged = torch.maximum(top, new_top)
    return merged, total * (top - merged).exp() + new_total * (new_top - merged).exp()


def take_positives(logits: Tensor, i0: int, i1: int, j0: int, j1: int, positives: Tensor) -> None:
    """Copy ``X_ii`` for the rows of block ``[i0, i1)`` whose positive column ``i`` is in ``[j0, j1)``."""
    lo, hi = max(i0, j0), min(i1, j1)
    if lo < hi:
        positives[lo:hi] = logits[lo - i0:hi - i0, lo - j0:hi - j0].diagonal()
