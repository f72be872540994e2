"""Small CLIP and ALBEF models for the reference training loop (:mod:`lsr_kernels.train`).

Both families expose ``encode_image(images)`` and ``encode_text(tokens)`` (unit-norm features for
evaluation), ``scale()`` (the loss's ``logit_scale``) and ``losses(...)`` (the training objective,
computed through :class:`lsr_kernels.LSRLoss` / :func:`lsr_kernels.itc_loss`).
"""
from __future__ import annotations

from typing import Union

from .albef import ALBEF, ALBEFConfig
from .clip import CLIP, CLIPConfig

FAMILIES = {"clip": (CLIP, CLIPConfig), "albef": (ALBEF, ALBEFConfig)}


def build_model(family: str, **config) -> Union[CLIP, ALBEF]:
    """``build_model("clip", vocab_size=60, ...)``: the model of ``family`` with a config from keywords."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {tuple(FAMILIES)}, got {family!r}")
    model_cls, config_cls = FAMILIES[family]
    return model_cls(config_cls(**config))


__all__ = ["CLIP", "CLIPConfig", "ALBEF", "ALBEFConfig", "FAMILIES", "build_model"]
