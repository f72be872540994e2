"""Public functional API: validate once (SPEC section 6), resolve the backend, compute.

``backend`` is one of ``"auto"``, ``"reference"``, ``"chunked"``, ``"triton"``, ``"cuda"``; the rule
``"auto"`` follows is :func:`lsr_kernels.backends.resolve` (the only place it is written).
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor

from . import backends, composite, reference
from . import _validation as V


def _contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def lsr_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    *,
    image_aug: Optional[Tensor] = None,
    text_aug: Optional[Tensor] = None,
    image_ind: Optional[Tensor] = None,
    text_ind: Optional[Tensor] = None,
    image_ind_aug: Optional[Tensor] = None,
    text_ind_aug: Optional[Tensor] = None,
    sep_weight: float = 1.0,
    bridge_weight: float = 1.0,
    gc_weight: float = 0.25,
    bridge_t: float = 0.25,
    uniformity_t: float = 2.0,
    backend: str = "auto",
) -> Dict[str, Tensor]:
    """The full objective of SPEC 2.5 and each of its terms.

    ``L = L_con + sep_weight * L_sep + bridge_weight * L_br + gc_weight * (L_gc + L_gca)``.

    Args:
        image_features, text_features: ``[N, D]`` L2-normalised rows (``V``, ``T``).
        logit_scale: the already-exponentiated scale ``s`` (a CLIP model passes ``logit_scale.exp()``,
            an ALBEF model ``1 / temp``); a scalar tensor that may require grad, in (0, 1e6].
        image_aug, text_aug: augmented views ``Va``, ``Ta``. With both, the contrastive loss is the
            four-term form of SPEC 2.1 and geometric consistency adds ``L_gca``. The bridge needs
            ``image_aug``.
        image_ind, text_ind, image_ind_aug, text_ind_aug: the independent heads' features ``Vi``,
            ``Ti``, ``Via``, ``Tia`` (separation only).
        sep_weight, bridge_weight, gc_weight: default to the paper's ``1``, ``1`` and ``0.25`` (SPEC 2.5),
            so by default separation needs the four independent-head inputs and the bridge needs
            ``image_aug``; a weight of 0 switches its term off and makes its inputs optional.
        bridge_t: the bridge position ``t`` in (0, 1) (paper: 0.25).
        uniformity_t: the uniformity temperature ``t_u`` in (0, 1e4] (paper: 2; past 1e4 fp32 rounding
            of the Gram diagonal would decide the loss).
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``{"loss", "contrastive_loss"}`` plus the unweighted ``"separation_loss"``, ``"bridge_loss"``,
        ``"geometric_loss"`` of the terms that are on; 0-dim float32 tensors (float64 for float64
        inputs).
    """
    features = {
        "image_features": image_features, "text_features": text_features,
        "image_aug": image_aug, "text_aug": text_aug,
        "image_ind": image_ind, "text_ind": text_ind,
        "image_ind_aug": image_ind_aug, "text_ind_aug": text_ind_aug,
    }
    (sep_weight, bridge_weight, gc_weight), (bridge_t, uniformity_t), scale = V.check_lsr_call(
        features, logit_scale, sep_weight, bridge_weight, gc_weight, bridge_t, uniformity_t)
    args = {k: _contiguous(v) for k, v in features.items()}
    image, text = args.pop("image_features"), args.pop("text_features")
    switches = dict(bridge_t=bridge_t, uniformity_t=uniformity_t)
    name = backends.resolve_lsr_call(backend, features, (sep_weight, bridge_weight, gc_weight))
    if name == "reference":
        terms = reference.lsr_terms(image, text, scale, separation=sep_weight > 0, bridge=bridge_weight > 0,
                                    geometric=gc_weight > 0, **args, **switches)
    else:
        terms = composite.lsr_terms(backends.primitives(name), image, text, scale, separation_on=sep_weight > 0,
                                    bridge_on=bridge_weight > 0, geometric_on=gc_weight > 0, **args, **switches)
    weights = {"separation_loss": sep_weight, "bridge_loss": bridge_weight, "geometric_loss": gc_weight}
    loss = terms["contrastive_loss"]
    for key, weight in weights.items():
        if key in terms:
            loss = loss + weight * terms[key]
    return {"loss": loss, **terms}


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *, backend: str = "auto") -> Tensor:
    """CLIP's symmetric InfoNCE (SPEC 2.1 without views), equal to open_clip's ``ClipLoss``:
    ``(CE(s V T^T) + CE(s T V^T)) / 2``."""
    return lsr_loss(image_features, text_features, logit_scale, sep_weight=0.0, bridge_weight=0.0, gc_weight=0.0,
                    backend=backend)["loss"]


def itc_loss(
    image_features: Tensor,
    text_features: Tensor,
    image_features_m: Tensor,
    text_features_m: Tensor,
    logit_scale,
    *,
    image_queue: Optional[Tensor] = None,
    text_queue: Optional[Tensor] = None,
    alpha: float = 0.4,
    backend: str = "auto",
) -> Tensor:
    """ALBEF's image-text contrastive loss with momentum distillation and a queue (SPEC 2.6).

    ``image_features_m``, ``text_features_m``: the momentum encoders' ``[N, D]`` features (no
    gradient); ``image_queue``, ``text_queue``: ``[K, D]`` queues of earlier momentum features (each
    optional; K may differ); ``logit_scale``: ``1 / temp``; ``alpha``: the distillation weight in
    [0, 1]. Gradients reach ``image_features``, ``text_features`` and ``logit_scale`` only.
    """
    alpha = V.check_unit_interval("alpha", alpha)
    features = {"image_features": image_features, "text_features": text_features,
                "image_features_m": image_features_m, "text_features_m": text_features_m,
                "image_queue": image_queue, "text_queue": text_queue}
    V.check_features(features, width_only=("image_queue", "text_queue"), required=V.ITC_REQUIRED)
    scale = V.check_scale(logit_scale, image_features)
    args = {k: _contiguous(v) for k, v in features.items()}
    name = backends.resolve_itc_call(backend, features)
    if name == "reference":
        return reference.itc_loss(args["image_features"], args["text_features"], args["image_features_m"],
                                  args["text_features_m"], scale, args["image_queue"], args["text_queue"], alpha)
    return composite.itc(backends.primitives(name), args["image_features"], args["text_features"],
                         args["image_features_m"], args["text_features_m"], scale,
                         args["image_queue"], args["text_queue"], alpha)
