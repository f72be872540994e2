"""The SPEC terms composed from a fast backend's primitives (see :mod:`lsr_kernels.backends`).

This is the one place where the terms of SPEC 2.1 to 2.6 are assembled for the fast backends. The
N x N work goes through the backend's three primitives; the rest never needs an N x N matrix and is
shared by every fast backend:

- orthogonality and the Brownian bridge are row-wise (O(N D));
- geometric consistency uses the Gram identities of SPEC 2.4, so it costs O(N D^2) and D x D memory:
  ``||A A^T - C C^T||_F^2 = ||A^T A||_F^2 - 2 ||A^T C||_F^2 + ||C^T C||_F^2`` and
  ``||A B^T - B A^T||_F^2 = 2 <A^T A, B^T B>_F - 2 trace((B^T A)^2)``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _wide(x: Tensor) -> Tensor:
    # float32 arithmetic for fp16/bf16/fp32, float64 kept (gradcheck).
    return x if x.dtype == torch.float64 else x.float()


def contrastive(prims: ModuleType, image: Tensor, text: Tensor, scale: Tensor,
                image_aug: Optional[Tensor] = None, text_aug: Optional[Tensor] = None) -> Tensor:
    """SPEC 2.1. Both directions of ``S_VT`` come from one symmetric ``info_nce`` call."""
    cross = prims.info_nce(image, text, scale, True)  # (L_v2t + L_t2v) / 2
    if image_aug is None or text_aug is None:
        return cross
    in_modal = prims.info_nce(image, image_aug, scale, False) + prims.info_nce(text, text_aug, scale, False)
    return cross / 2 + in_modal / 4


def orthogonality(image: Tensor, text: Tensor, image_ind: Tensor, text_ind: Tensor) -> Tensor:
    """SPEC 2.2 ``L_ortho``, row-wise."""
    dv = (_wide(image) * _wide(image_ind)).sum(-1)
    dt = (_wide(text) * _wide(text_ind)).sum(-1)
    return (dv.square() + dt.square()).mean()


def separation(prims: ModuleType, image: Tensor, text: Tensor, image_ind: Tensor, text_ind: Tensor,
               image_ind_aug: Tensor, text_ind_aug: Tensor, scale: Tensor, uniformity_t: float) -> Tensor:
    """SPEC 2.2 ``L_sep = L_ortho + L_icon + L_uni``."""
    n = image.shape[0]
    icon = prims.info_nce(image_ind, image_ind_aug, scale, False) + prims.info_nce(text_ind, text_ind_aug, scale, False)
    uni = torch.log((prims.exp_gram_sum(image_ind, uniformity_t) + prims.exp_gram_sum(text_ind, uniformity_t)) / n)
    return orthogonality(image, text, image_ind, text_ind) + icon + uni


def bridge(image: Tensor, text: Tensor, image_aug: Tensor, t: float) -> Tensor:
    """SPEC 2.3, row-wise: ``mean_j ||Va_j - normalize(t V_j + (1 - t) T_j)||^2``."""
    mu = F.normalize(t * _wide(image) + (1 - t) * _wide(text), dim=-1)
    return (_wide(image_aug) - mu).square().sum(-1).mean()


def _gram_distance(gram_a: Tensor, cross: Tensor, gram_c: Tensor) -> Tensor:
    """``||A A^T - C C^T||_F^2`` from ``A^T A``, ``A^T C`` (or its transpose) and ``C^T C``."""
    return gram_a.square().sum() - 2 * cross.square().sum() + gram_c.square().sum()


def geometric_grams(image: Tensor, text: Tensor, image_aug: Optional[Tensor] = None,
                    text_aug: Optional[Tensor] = None) -> Tensor:
    """The D x D Grams geometric consistency needs, stacked ``[3 or 7, D, D]`` in float64.

    ``[V^T V, T^T T, T^T V]`` and, with both views, ``[V^T Va, Va^T Va, T^T Ta, Ta^T Ta]``. They are sums
    over rows, so the distributed path all-reduces this stack. The identities subtract quantities of
    size ~N^2 to get a result that can be far smaller, hence float64 (O(N D^2) work, negligible next
    to the N^2 D terms).
    """
    v, t = image.double(), text.double()
    grams = [v.T @ v, t.T @ t, t.T @ v]
    if image_aug is not None and text_aug is not None:
        va, ta = image_aug.double(), text_aug.double()
        grams += [v.T @ va, va.T @ va, t.T @ ta, ta.T @ ta]
    return torch.stack(grams)


def geometric_from_grams(grams: Tensor, n: int, pair_gap: Optional[Tensor]) -> Tensor:
    """SPEC 2.4 from :func:`geometric_grams` over ``n`` rows; ``pair_gap`` is the row-wise term of
    ``L_gca``, ``mean_j (<V_j, T_j> - <Va_j, Ta_j>)^2`` (``None`` without views)."""
    g_vv, g_tt, g_tv = grams[0], grams[1], grams[2]
    # ||V T^T - T V^T||^2 = 2 <V^T V, T^T T> - 2 trace((T^T V)^2);  trace(G G) = <G, G^T>
    skew = 2 * (g_vv * g_tt).sum() - 2 * (g_tv * g_tv.T).sum()
    loss = (skew + _gram_distance(g_vv, g_tv, g_tt)) / n
    if grams.shape[0] == 3:
        return loss
    aug = _gram_distance(g_vv, grams[3], grams[4]) + _gram_distance(g_tt, grams[5], grams[6])
    return loss + aug / n + pair_gap


def pair_gap(image: Tensor, text: Tensor, image_aug: Tensor, text_aug: Tensor) -> Tensor:
    """``mean_j (<V_j, T_j> - <Va_j, Ta_j>)^2``, row-wise, in float64."""
    return ((image.double() * text.double()).sum(-1)
            - (image_aug.double() * text_aug.double()).sum(-1)).square().mean()


def geometric(image: Tensor, text: Tensor, image_aug: Optional[Tensor] = None,
              text_aug: Optional[Tensor] = None) -> Tensor:
    """SPEC 2.4 ``L_gc (+ L_gca)`` through the Gram identities: no N x N matrix at all.
    Returned in float32 (float64 for float64 inputs)."""
    views = image_aug is not None and text_aug is not None
    gap = pair_gap(image, text, image_aug, text_aug) if views else None
    loss = geometric_from_grams(geometric_grams(image, text, image_aug, text_aug), image.shape[0], gap)
    return loss.to(torch.float64 if image.dtype == torch.float64 else torch.float32)


def lsr_terms(prims: ModuleType, image: Tensor, text: Tensor, scale: Tensor, *,
              image_aug: Optional[Tensor], text_aug: Optional[Tensor],
              image_ind: Optional[Tensor], text_ind: Optional[Tensor],
              image_ind_aug: Optional[Tensor], text_ind_aug: Optional[Tensor],
              separation_on: bool, bridge_on: bool, geometric_on: bool,
              bridge_t: float, uniformity_t: float) -> dict:
    """The unweighted terms that are on, keyed as :func:`lsr_kernels.lsr_loss` returns them."""
    out = {"contrastive_loss": contrastive(prims, image, text, scale, image_aug, text_aug)}
    if separation_on:
        out["separation_loss"] = separation(prims, image, text, image_ind, text_ind,
                                            image_ind_aug, text_ind_aug, scale, uniformity_t)
    if bridge_on:
        out["bridge_loss"] = bridge(image, text, image_aug, bridge_t)
    if geometric_on:
        out["geometric_loss"] = geometric(image, text, image_aug, text_aug)
    return out


def itc(prims: ModuleType, image: Tensor, text: Tensor, image_m: Tensor, text_m: Tensor, scale: Tensor,
        image_queue: Optional[Tensor], text_queue: Optional[Tensor], alpha: float) -> Tensor:
    """SPEC 2.6: ``(L_i2t + L_t2i) / 2`` over the banks ``[Tm; Qt]`` and ``[Vm; Qv]`` (no gradient)."""
    bank_t = text_m if text_queue is None else torch.cat([text_m, text_queue], 0)
    bank_v = image_m if image_queue is None else torch.cat([image_m, image_queue], 0)
    i2t = prims.itc_soft_ce(image, image_m.detach(), bank_t.detach(), scale, alpha)
    t2i = prims.itc_soft_ce(text, text_m.detach(), bank_v.detach(), scale, alpha)
    return (i2t + t2i) / 2
