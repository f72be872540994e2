"""Paper-faithful PyTorch reference of every term in ``SPEC.md`` (the oracle for every backend).

Each function materialises the matrices the formula names and lets autograd differentiate it, so it is
simple and obviously right, and O(N^2) in memory: use it for tests and small batches only. Section
numbers refer to ``SPEC.md``. No function renormalises its inputs (the model does that).

The three *primitives* at the bottom (:func:`info_nce`, :func:`exp_gram_sum`, :func:`itc_soft_ce`)
have exactly the signatures of the fast backends' primitives (see :mod:`lsr_kernels.backends`), so
the primitive-level parity tests compare like with like.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _wide(x: Tensor) -> Tensor:
    # float32 arithmetic for fp16/bf16/fp32 inputs, float64 kept (for gradcheck).
    return x if x.dtype == torch.float64 else x.float()


def cross_entropy_diag(logits: Tensor) -> Tensor:
    """``CE(X) = mean_i -log softmax(X)[i, i]`` for a square ``X``, computed in float32."""
    n = logits.shape[0]
    return F.cross_entropy(_wide(logits), torch.arange(n, device=logits.device))


def _logits(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    # The product in the inputs' dtype (tensor cores for fp16/bf16), scale and softmax in float32
    # (float64 when the inputs are float64, for gradcheck).
    prod = a @ b.T
    return scale * _wide(prod)


# --------------------------------------------------------------------------------------------- 2.1
def contrastive_loss(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    image_aug: Optional[Tensor] = None,
    text_aug: Optional[Tensor] = None,
) -> Tensor:
    """SPEC 2.1.

    ``L_v2t = CE(s V T^T)``, ``L_t2v = CE(s T V^T)``, ``L_v2v = CE(s V Va^T)``, ``L_t2t = CE(s T Ta^T)``;
    ``(L_v2t + L_t2v + L_v2v + L_t2t) / 4`` with augmented views, ``(L_v2t + L_t2v) / 2`` without
    (identical to open_clip's ``ClipLoss``). Both views or neither.
    """
    l_v2t = cross_entropy_diag(_logits(image, text, scale))
    l_t2v = cross_entropy_diag(_logits(text, image, scale))
    if image_aug is None or text_aug is None:
        return (l_v2t + l_t2v) / 2
    l_v2v = cross_entropy_diag(_logits(image, image_aug, scale))
    l_t2t = cross_entropy_diag(_logits(text, text_aug, scale))
    return (l_v2t + l_t2v + l_v2v + l_t2t) / 4


# --------------------------------------------------------------------------------------------- 2.2
def orthogonality_loss(image: Tensor, text: Tensor, image_ind: Tensor, text_ind: Tensor) -> Tensor:
    """SPEC 2.2: ``L_ortho = (1/N) sum_j (<V_j, Vi_j>^2 + <T_j, Ti_j>^2)``."""
    dv = (_wide(image) * _wide(image_ind)).sum(-1)
    dt = (_wide(text) * _wide(text_ind)).sum(-1)
    return (dv.pow(2) + dt.pow(2)).mean()


def independent_contrastive_loss(
    image_ind: Tensor, text_ind: Tensor, image_ind_aug: Tensor, text_ind_aug: Tensor, scale: Tensor
) -> Tensor:
    """SPEC 2.2: ``L_icon = CE(s Vi Via^T) + CE(s Ti Tia^T)`` (a sum, not a mean)."""
    return cross_entropy_diag(_logits(image_ind, image_ind_aug, scale)) + cross_entropy_diag(
        _logits(text_ind, text_ind_aug, scale)
    )


def _squared_distances(x: Tensor) -> Tensor:
    # ||x_j - x_k||^2 = |x_j|^2 + |x_k|^2 - 2 <x_j, x_k>, exact for any rows (not only unit ones).
    x = _wide(x)
    sq = x.pow(2).sum(-1)
    return sq[:, None] + sq[None, :] - 2 * (x @ x.T)


def uniformity_loss(image_ind: Tensor, text_ind: Tensor, t: float = 2.0) -> Tensor:
    """SPEC 2.2: ``L_uni = log((1/N) sum_{j,k} [exp(-t ||Vi_j - Vi_k||^2) + exp(-t ||Ti_j - Ti_k||^2)])``.

    The pair ``j = k`` is included; one log over both modalities.
    """
    n = image_ind.shape[0]
    total = torch.exp(-t * _squared_distances(image_ind)).sum() + torch.exp(-t * _squared_distances(text_ind)).sum()
    return torch.log(total / n)


def separation_loss(
    image: Tensor,
    text: Tensor,
    image_ind: Tensor,
    text_ind: Tensor,
    image_ind_aug: Tensor,
    text_ind_aug: Tensor,
    scale: Tensor,
    uniformity_t: float = 2.0,
) -> Tensor:
    """SPEC 2.2: ``L_sep = L_ortho + L_icon + L_uni``."""
    return (
        orthogonality_loss(image, text, image_ind, text_ind)
        + independent_contrastive_loss(image_ind, text_ind, image_ind_aug, text_ind_aug, scale)
        + uniformity_loss(image_ind, text_ind, uniformity_t)
    )


# --------------------------------------------------------------------------------------------- 2.3
def bridge_loss(image: Tensor, text: Tensor, image_aug: Tensor, t: float = 0.25) -> Tensor:
    """SPEC 2.3: ``mu_j = normalize(t V_j + (1 - t) T_j)``, ``L_br = (1/N) sum_j ||Va_j - mu_j||^2``."""
    mu = F.normalize(t * _wide(image) + (1 - t) * _wide(text), dim=-1)
    return (_wide(image_aug) - mu).pow(2).sum(-1).mean()


# --------------------------------------------------------------------------------------------- 2.4
def geometric_loss(
    image: Tensor, text: Tensor, image_aug: Optional[Tensor] = None, text_aug: Optional[Tensor] = None
) -> Tensor:
    """SPEC 2.4, with the N x N similarity matrices written out.

    ``L_gc = (1/N)(||S_VT - S_VT^T||_F^2 + ||S_VV - S_TT||_F^2)``;
    with augmented views also ``L_gca = (1/N)(||S_VV - S_VaVa||_F^2 + ||S_TT - S_TaTa||_F^2)
    + (1/N) sum_j (<V_j, T_j> - <Va_j, Ta_j>)^2``. Returns ``L_gc + L_gca``.
    """
    v, t = _wide(image), _wide(text)
    n = v.shape[0]
    s_vt, s_vv, s_tt = v @ t.T, v @ v.T, t @ t.T
    loss = ((s_vt - s_vt.T).pow(2).sum() + (s_vv - s_tt).pow(2).sum()) / n
    if image_aug is None or text_aug is None:
        return loss
    va, ta = _wide(image_aug), _wide(text_aug)
    loss = loss + ((s_vv - va @ va.T).pow(2).sum() + (s_tt - ta @ ta.T).pow(2).sum()) / n
    return loss + ((v * t).sum(-1) - (va * ta).sum(-1)).pow(2).mean()


# --------------------------------------------------------------------------------------------- 2.6
def itc_loss(
    image: Tensor,
    text: Tensor,
    image_m: Tensor,
    text_m: Tensor,
    scale: Tensor,
    image_queue: Optional[Tensor] = None,
    text_queue: Optional[Tensor] = None,
    alpha: float = 0.4,
) -> Tensor:
    """SPEC 2.6: ALBEF's image-text contrastive loss with momentum distillation and a queue.

    ``BankT = [Tm; Qt]``, ``BankV = [Vm; Qv]``; ``P_i2t = softmax(s V BankT^T)``; soft targets
    ``Y_i2t = alpha softmax(s Vm BankT^T) + (1 - alpha) onehot(i)`` (no gradient, as ALBEF computes
    them under ``no_grad``); ``L_i2t = -(1/N) sum_ij Y_ij log P_ij``; the same for ``t2i``;
    ``L_itc = (L_i2t + L_t2i) / 2``. Gradients reach ``image``, ``text`` and ``scale`` only.
    """
    bank_t = text_m if text_queue is None else torch.cat([text_m, text_queue], 0)
    bank_v = image_m if image_queue is None else torch.cat([image_m, image_queue], 0)
    return (
        itc_soft_ce(image, image_m, bank_t.detach(), scale, alpha)
        + itc_soft_ce(text, text_m, bank_v.detach(), scale, alpha)
    ) / 2


# --------------------------------------------------------------------------------------------- 2.5
def lsr_terms(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    *,
    image_aug: Optional[Tensor] = None,
    text_aug: Optional[Tensor] = None,
    image_ind: Optional[Tensor] = None,
    text_ind: Optional[Tensor] = None,
    image_ind_aug: Optional[Tensor] = None,
    text_ind_aug: Optional[Tensor] = None,
    separation: bool = False,
    bridge: bool = False,
    geometric: bool = False,
    bridge_t: float = 0.25,
    uniformity_t: float = 2.0,
) -> dict:
    """The unweighted terms of SPEC 2.5 that are switched on, keyed as :func:`lsr_kernels.lsr_loss` returns them."""
    out = {"contrastive_loss": contrastive_loss(image, text, scale, image_aug, text_aug)}
    if separation:
        out["separation_loss"] = separation_loss(
            image, text, image_ind, text_ind, image_ind_aug, text_ind_aug, scale, uniformity_t
        )
    if bridge:
        out["bridge_loss"] = bridge_loss(image, text, image_aug, bridge_t)
    if geometric:
        out["geometric_loss"] = geometric_loss(image, text, image_aug, text_aug)
    return out


# ------------------------------------------------------------------ primitives (backend contract)
def info_nce(a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, offset: int = 0) -> Tensor:
    """``CE(s a b^T)``, or ``(CE(s a b^T) + CE(s b a^T)) / 2`` when ``symmetric``. One-way, ``b`` may
    have ``M >= N`` rows with the positive of row ``i`` at column ``offset + i``."""
    logits = _logits(a, b, scale)
    if not symmetric:
        labels = torch.arange(a.shape[0], device=a.device) + offset
        return F.cross_entropy(logits, labels)
    return (cross_entropy_diag(logits) + cross_entropy_diag(logits.T)) / 2


def exp_gram_sum(x: Tensor, t: float) -> Tensor:
    """``sum_{j,k} exp(-t ||x_j - x_k||^2)``, the pair ``j = k`` included, in float32."""
    return torch.exp(-t * _squared_distances(x)).sum()


def itc_soft_ce(q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, alpha: float) -> Tensor:
    """``-(1/N) sum_ij Y_ij log softmax(s q bank^T)_ij`` with
    ``Y = alpha softmax(s q_m bank^T) + (1 - alpha) I`` (positives: the first N rows of ``bank``).
    Gradients reach ``q`` and ``scale`` only: the bank, like the soft targets, is a constant
    (ALBEF's momentum features and queue), as in every backend's primitive."""
    n = q.shape[0]
    bank = bank.detach()
    log_p = torch.log_softmax(_logits(q, bank, scale), dim=1)
    with torch.no_grad():
        targets = alpha * torch.softmax(_logits(q_m, bank, scale), dim=1)
        targets[:, :n] += (1 - alpha) * torch.eye(n, device=q.device, dtype=targets.dtype)
    return -(targets * log_p).sum(1).mean()


__all__ = [
    "cross_entropy_diag",
    "contrastive_loss",
    "orthogonality_loss",
    "independent_contrastive_loss",
    "uniformity_loss",
    "separation_loss",
    "bridge_loss",
    "geometric_loss",
    "itc_loss",
    "lsr_terms",
    "info_nce",
    "exp_gram_sum",
    "itc_soft_ce",
]
