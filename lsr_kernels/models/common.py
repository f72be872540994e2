"""Building blocks shared by the CLIP and ALBEF models: pre-norm transformer blocks (self-attention,
optional cross-attention), a ViT image encoder, a text transformer, and projection heads.

Attention uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU, a plain
path on CPU). Masks are boolean, ``True`` meaning "may attend".
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT/ViT-style initialisation: truncated-normal weights, zero biases, unit LayerNorm gains."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (``x`` itself when ``context`` is None)."""

    def __init__(self, width: int, heads: int, context_width: Optional[int] = None):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width: {width} is not divisible by heads = {heads}")
        context_width = width if context_width is None else context_width
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                causal: bool = False) -> Tensor:
        b, n, w = x.shape
        context = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int):
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, then (fusion layers) cross-attention, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, cross_width: Optional[int] = None):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.cross_attn = None
        if cross_width is not None:
            self.norm_cross = nn.LayerNorm(width)
            self.cross_attn = Attention(width, heads, cross_width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, causal: bool = False,
                context: Optional[Tensor] = None, context_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.self_attn(self.norm_self(x), mask=mask, causal=causal)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("context: a fusion (cross-attention) block needs the image tokens")
            x = x + self.cross_attn(self.norm_cross(x), context=context, mask=context_mask)
        return x + self.mlp(self.norm_mlp(x))


class VisionTransformer(nn.Module):
    """ViT: non-overlapping patches, a class token, learned positions, pre-norm blocks, a final norm.

    ``forward(images [B, C, H, W]) -> tokens [B, 1 + P, width]``; token 0 is the class token.
    """

    def __init__(self, image_size: int, patch_size: int, channels: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size: {image_size} is not a multiple of patch_size = {patch_size}")
        self.image_size, self.channels = image_size, channels
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        init_weights(self)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"images: expected [B, {self.channels}, {self.image_size}, {self.image_size}], "
                             f"got shape {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """``[B, 1, 1, L]`` boolean key mask: ``True`` on real tokens (broadcasts over heads and queries)."""
    return (tokens != pad_id)[:, None, None, :]


class TextEmbedding(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, vocab_size: int, context_length: int, width: int):
        super().__init__()
        self.context_length = context_length
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(1, context_length, width))
        nn.init.trunc_normal_(self.position, std=0.01)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"text: expected [B, L] token ids with L <= {self.context_length}, "
                             f"got shape {tuple(tokens.shape)}")
        return self.token(tokens) + self.position[:, : tokens.shape[1]]


class TextTransformer(nn.Module):
    """A stack of blocks over token embeddings: causal (CLIP) or bidirectional with a padding mask (BERT).

    ``forward(tokens [B, L]) -> hidden states [B, L, width]`` (after a final norm).
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, causal: bool = True, pad_id: int = 0):
        super().__init__()
        self.causal, self.pad_id = causal, pad_id
        self.embed = TextEmbedding(vocab_size, context_length, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        init_weights(self)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        # Causal: padding comes after [EOS], so the pooled [EOS] state never sees it; no mask needed.
        mask = None if self.causal else padding_mask(tokens, self.pad_id)
        for block in self.blocks:
            x = block(x, mask=mask, causal=self.causal)
        return self.norm(x)


def eos_positions(tokens: Tensor, pad_id: int) -> Tensor:
    """Index of the last non-padding token of each row (the ``[EOS]`` token)."""
    lengths = (tokens != pad_id).sum(dim=1)
    return (lengths - 1).clamp(min=0)


class Projection(nn.Module):
    """A linear map to the joint embedding space followed by L2 normalisation (unit rows)."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.linear = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.linear.weight, std=width ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x), dim=-1)


def check_positive_ints(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name}: expected a positive int, got {value!r}")


def log_inverse_temperature(temperature: float) -> float:
    return math.log(1.0 / temperature)


__all__ = [
    "init_weights", "Attention", "MLP", "Block", "VisionTransformer", "padding_mask", "TextEmbedding",
    "TextTransformer", "eos_positions", "Projection", "check_positive_ints", "log_inverse_temperature",
]
