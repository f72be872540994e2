"""A small CLIP two-tower model with the extra "independent" heads of the separation loss (SPEC 2.2).

Image tower: a ViT, pooled at its class token. Text tower: a transformer (causal by default, like
CLIP), pooled at the ``[EOS]`` token. Each tower has a projection head to the joint space and an
independent head (``Vi``, ``Ti``); every output row is L2-normalised. The logit scale is learned in
log space, initialised at ``log(1 / 0.07)``, and exponentiated with a clamp at 100, as in CLIP.

:meth:`CLIP.losses` is the training objective: one forward of the originals and their augmented
views (concatenated into one batch), then :class:`lsr_kernels.LSRLoss` for SPEC 2.5.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .common import Projection, TextTransformer, VisionTransformer, check_positive_ints, eos_positions


@dataclass
class CLIPConfig:
    """Sizes of the two towers; the defaults train on a 2-core CPU in minutes (16x16 digits)."""

    vocab_size: int = 128
    context_length: int = 16
    image_size: int = 16
    channels: int = 1
    patch_size: int = 4
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    causal_text: bool = True
    mlp_ratio: float = 2.0
    embed_dim: int = 32
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    pad_id: int = 0

    def __post_init__(self):
        check_positive_ints("CLIPConfig", vocab_size=self.vocab_size, context_length=self.context_length,
                            image_size=self.image_size, channels=self.channels, patch_size=self.patch_size,
                            vision_width=self.vision_width, vision_layers=self.vision_layers,
                            vision_heads=self.vision_heads, text_width=self.text_width,
                            text_layers=self.text_layers, text_heads=self.text_heads, embed_dim=self.embed_dim)
        if not 0.0 < self.init_temperature < 1.0:
            raise ValueError(f"CLIPConfig.init_temperature: expected a value in (0, 1), got {self.init_temperature}")
        if self.max_logit_scale <= 1.0:
            raise ValueError(f"CLIPConfig.max_logit_scale: expected > 1, got {self.max_logit_scale}")

    def to_dict(self) -> dict:
        return asdict(self)


class CLIP(nn.Module):
    family = "clip"

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = c = config
        self.visual = VisionTransformer(c.image_size, c.patch_size, c.channels, c.vision_width, c.vision_layers,
                                        c.vision_heads, c.mlp_ratio)
        self.text = TextTransformer(c.vocab_size, c.context_length, c.text_width, c.text_layers, c.text_heads,
                                    c.mlp_ratio, causal=c.causal_text, pad_id=c.pad_id)
        self.image_proj = Projection(c.vision_width, c.embed_dim)
        self.text_proj = Projection(c.text_width, c.embed_dim)
        # The separation loss's independent heads (SPEC 2.2): same input, a second projection.
        self.image_ind_proj = Projection(c.vision_width, c.embed_dim)
        self.text_ind_proj = Projection(c.text_width, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / c.init_temperature)))

    # --------------------------------------------------------------------------------- encoders
    def image_embedding(self, images: Tensor) -> Tensor:
        """The pooled (class-token) image embedding ``[B, vision_width]``."""
        return self.visual(images)[:, 0]

    def text_embedding(self, text: Tensor) -> Tensor:
        """The pooled text embedding ``[B, text_width]``: the ``[EOS]`` state (CLS when bidirectional)."""
        hidden = self.text(text)
        if not self.config.causal_text:
            return hidden[:, 0]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_positions(text, self.config.pad_id)]

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_proj(self.image_embedding(images))

    def encode_text(self, text: Tensor) -> Tensor:
        return self.text_proj(self.text_embedding(text))

    def scale(self) -> Tensor:
        """``s = exp(logit_scale)`` clamped at ``max_logit_scale`` (what the loss's ``logit_scale`` takes)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep the parameter where its gradient is alive (open_clip clamps after each step)."""
        self.logit_scale.clamp_(0.0, math.log(self.config.max_logit_scale))

    def forward(self, images: Tensor, text: Tensor, independent: bool = False) -> Dict[str, Tensor]:
        """Unit-norm ``image_features``, ``text_features`` ``[B, embed_dim]``, the scale ``logit_scale``,
        and with ``independent`` the independent heads' ``image_ind``, ``text_ind``."""
        v, t = self.image_embedding(images), self.text_embedding(text)
        out = {"image_features": self.image_proj(v), "text_features": self.text_proj(t), "logit_scale": self.scale()}
        if independent:
            out["image_ind"] = self.image_ind_proj(v)
            out["text_ind"] = self.text_ind_proj(t)
        return out

    # -------------------------------------------------------------------------------- objective
    def losses(self, images: Tensor, text: Tensor, lsr_loss: nn.Module, images_aug: Optional[Tensor] = None,
               text_aug: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """SPEC 2.5 for one batch: the total ``"loss"``, each term as it enters the total (the
        weighted parts :class:`lsr_kernels.LSRLoss` returns with ``output_dict=True``), and
        ``"logit_scale"`` (detached, for logging).

        With views (``images_aug`` and ``text_aug``) the online encoders also run on them (gradient
        flows, SPEC 1); the contrastive loss becomes the four-term form of SPEC 2.1.
        """
        if (images_aug is None) != (text_aug is None):
            raise ValueError("images_aug and text_aug: pass both augmented views or neither")
        if text_aug is not None and text_aug.shape != text.shape:
            raise ValueError(f"text_aug: shape {tuple(text_aug.shape)} differs from text's {tuple(text.shape)}")
        independent = getattr(lsr_loss, "sep_weight", 0.0) > 0
        b = images.shape[0]
        if images_aug is not None:
            # One pass over originals and views: half the kernel launches of two passes.
            both = self(torch.cat([images, images_aug]), torch.cat([text, text_aug]),
                        independent=independent)
            feats = {k: v[:b] for k, v in both.items() if k != "logit_scale"}
            views = {k: v[b:] for k, v in both.items() if k != "logit_scale"}
            scale = both["logit_scale"]
        else:
            feats = self(images, text, independent=independent)
            scale = feats.pop("logit_scale")
            views = {}
        kwargs = dict(image_aug=views.get("image_features"), text_aug=views.get("text_features"))
        if independent:
            kwargs.update(image_ind=feats["image_ind"], text_ind=feats["text_ind"],
                          image_ind_aug=views.get("image_ind"), text_ind_aug=views.get("text_ind"))
        parts = lsr_loss(feats["image_features"], feats["text_features"], scale, output_dict=True, **kwargs)
        out = {"loss": sum(parts.values()), **parts}
        out["logit_scale"] = scale.detach()
        return out


__all__ = ["CLIPConfig", "CLIP"]
