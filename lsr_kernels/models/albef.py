"""A small ALBEF (Li et al., NeurIPS 2021): align before fuse, with momentum distillation.

- Image encoder: a ViT. Text encoder: the first layers of a BERT-like bidirectional transformer,
  pooled at ``[CLS]``. Fusion encoder: the later layers, each with cross-attention to the image tokens.
- Momentum copies of every encoder and head, updated by EMA (``momentum`` 0.995) at the start of each
  training forward, as ALBEF's ``_momentum_update``; queues (:class:`lsr_kernels.FeatureQueue`) of
  their features.
- Losses (:meth:`ALBEF.losses`):
  ITC with momentum distillation and the queues through :func:`lsr_kernels.itc_loss` (SPEC 2.6);
  ITM on the fusion ``[CLS]`` with one hard negative text per image and one hard negative image per
  text, sampled with probabilities ``softmax(s * sim)`` whose diagonal (and every pair with the same
  ``pair_ids``, BLIP's false-negative fix) is zeroed;
  MLM with 15% masking (80% ``[MASK]``, 10% a random word, 10% unchanged) distilled from the momentum
  model's predictions with weight ``alpha``;
  the LSR regularisers of SPEC 2.2-2.4 on the unimodal ITC features, with the momentum features as
  the augmented views (SPEC 2.1, "in the ALBEF family ... momentum encoders' features").
- The temperature is learned, clamped to [0.001, 0.5] before each forward; the scale is ``1 / temp``.

Randomness (masking, hard negatives) is drawn on the CPU from an explicit ``torch.Generator`` and
moved to the device, so a run is reproducible across devices and a resumed run repeats it exactly.

Data parallel (``lsr_loss`` an :class:`lsr_kernels.LSRLoss` with ``world_size > 1``, each rank holding
its contiguous share of the global batch): every term is that of the global batch. ITC contrasts each
rank's rows with every rank's momentum features and the queues, which take every rank's momentum
features in rank order; hard negatives are drawn from the whole global batch (the chosen text or
image tokens are gathered with their gradient, as BLIP does); the random numbers (Gumbel noise, MLM
masks) are drawn for the global batch and each rank keeps its rows; MLM is normalised by the global
count of predicted tokens. So each rank returns its share of the single-process losses (their mean
over ranks is the single-process value) and DDP's averaged gradients are the single-process ones.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..functional import itc_loss
from ..modules import REGULARISER_WEIGHTS, FeatureQueue, ITCLoss
from .common import Block, Projection, TextTransformer, VisionTransformer, check_positive_ints, init_weights, padding_mask


@dataclass
class ALBEFConfig:
    """Sizes and ALBEF's hyper-parameters; the defaults train on a 2-core CPU in minutes."""

    vocab_size: int = 128
    context_length: int = 16
    image_size: int = 16
    channels: int = 1
    patch_size: int = 4
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2  # unimodal text encoder ("the first layers of BERT")
    fusion_layers: int = 1  # cross-attention layers ("the later layers")
    text_heads: int = 4
    mlp_ratio: float = 2.0
    embed_dim: int = 32
    queue_size: int = 256
    momentum: float = 0.995
    alpha: float = 0.4
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    mlm_probability: float = 0.15
    pad_id: int = 0
    cls_id: int = 1
    eos_id: int = 2
    mask_id: int = 3
    num_special_tokens: int = 5  # ids below this are never drawn as MLM's random replacement words

    def __post_init__(self):
        check_positive_ints("ALBEFConfig", vocab_size=self.vocab_size, context_length=self.context_length,
                            image_size=self.image_size, channels=self.channels, patch_size=self.patch_size,
                            vision_width=self.vision_width, vision_layers=self.vision_layers,
                            vision_heads=self.vision_heads, text_width=self.text_width,
                            text_layers=self.text_layers, fusion_layers=self.fusion_layers,
                            text_heads=self.text_heads, embed_dim=self.embed_dim, queue_size=self.queue_size)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"ALBEFConfig.momentum: expected a value in [0, 1), got {self.momentum}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"ALBEFConfig.alpha: expected a value in [0, 1], got {self.alpha}")
        if not 0.0 < self.min_temperature <= self.init_temperature <= self.max_temperature:
            raise ValueError(f"ALBEFConfig temperatures: expected 0 < min <= init <= max, got "
                             f"{self.min_temperature}, {self.init_temperature}, {self.max_temperature}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"ALBEFConfig.mlm_probability: expected a value in (0, 1), got {self.mlm_probability}")
        if self.vocab_size <= self.num_special_tokens:
            raise ValueError(f"ALBEFConfig.vocab_size: {self.vocab_size} leaves no word after "
                             f"{self.num_special_tokens} special tokens")

    def to_dict(self) -> dict:
        return asdict(self)


class _Shard:
    """Where this step's rows sit in the global batch: rank ``rank`` of ``world`` holds rows
    ``rank * n .. (rank + 1) * n``. With one rank every method is the identity (single process)."""

    def __init__(self, lsr_loss: nn.Module):
        self.world = int(getattr(lsr_loss, "world_size", 1))
        self.rank = int(getattr(lsr_loss, "rank", 0)) if self.world > 1 else 0
        self.group = getattr(lsr_loss, "process_group", None)

    def gather(self, x: Tensor, *, with_grad: bool) -> Tensor:
        """Every rank's rows of ``x`` in rank order (the backward returns each rank its rows' gradient)."""
        return x if self.world == 1 else distributed.gather_features(x, self.group, with_grad=with_grad)

    def sum(self, x: Tensor) -> Tensor:
        return x if self.world == 1 else distributed.all_reduce_sum(x, self.group)


class FusionEncoder(nn.Module):
    """Text states attending to themselves (padding masked) and, by cross-attention, to the image tokens."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, image_width: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, cross_width=image_width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        init_weights(self)

    def forward(self, text_hidden: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        x = text_hidden
        for block in self.blocks:
            x = block(x, mask=text_mask, context=image_tokens)
        return self.norm(x)


class MLMHead(nn.Sequential):
    """BERT's prediction head: transform, GELU, LayerNorm, decoder to the vocabulary."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, vocab_size))
        init_weights(self)


class ALBEF(nn.Module):
    family = "albef"
    #: (online, momentum) submodule names; the momentum copy is an EMA of the online module.
    MOMENTUM_PAIRS = (("visual_encoder", "visual_encoder_m"), ("vision_proj", "vision_proj_m"),
                      ("text_encoder", "text_encoder_m"), ("text_proj", "text_proj_m"),
                      ("image_ind_proj", "image_ind_proj_m"), ("text_ind_proj", "text_ind_proj_m"),
                      ("fusion", "fusion_m"), ("mlm_head", "mlm_head_m"))

    def __init__(self, config: ALBEFConfig):
        super().__init__()
        self.config = c = config
        self.visual_encoder = VisionTransformer(c.image_size, c.patch_size, c.channels, c.vision_width,
                                                c.vision_layers, c.vision_heads, c.mlp_ratio)
        self.text_encoder = TextTransformer(c.vocab_size, c.context_length, c.text_width, c.text_layers,
                                            c.text_heads, c.mlp_ratio, causal=False, pad_id=c.pad_id)
        self.fusion = FusionEncoder(c.text_width, c.fusion_layers, c.text_heads, c.mlp_ratio, c.vision_width)
        self.vision_proj = Projection(c.vision_width, c.embed_dim)
        self.text_proj = Projection(c.text_width, c.embed_dim)
        self.image_ind_proj = Projection(c.vision_width, c.embed_dim)  # SPEC 2.2's independent heads
        self.text_ind_proj = Projection(c.text_width, c.embed_dim)
        self.itm_head = nn.Linear(c.text_width, 2)
        self.mlm_head = MLMHead(c.text_width, c.vocab_size)
        self.temp = nn.Parameter(torch.tensor(float(c.init_temperature)))
        for online, momentum in self.MOMENTUM_PAIRS:
            copy_ = copy.deepcopy(getattr(self, online))
            copy_.requires_grad_(False)
            setattr(self, momentum, copy_)
        self.image_queue = FeatureQueue(c.queue_size, c.embed_dim)
        self.text_queue = FeatureQueue(c.queue_size, c.embed_dim)

    # --------------------------------------------------------------------------------- encoders
    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm ITC image features ``[B, embed_dim]``."""
        return self.vision_proj(self.visual_encoder(images)[:, 0])

    def encode_text(self, text: Tensor) -> Tensor:
        """Unit-norm ITC text features ``[B, embed_dim]`` (the unimodal ``[CLS]`` state)."""
        return self.text_proj(self.text_encoder(text)[:, 0])

    def scale(self) -> Tensor:
        """``1 / temp`` (clamp the temperature first: :meth:`clamp_temperature_`)."""
        return 1.0 / self.temp

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        self.temp.clamp_(self.config.min_temperature, self.config.max_temperature)

    def forward(self, images: Tensor, text: Tensor) -> Dict[str, Tensor]:
        return {"image_features": self.encode_image(images), "text_features": self.encode_text(text),
                "logit_scale": self.scale()}

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m <- momentum * p_m + (1 - momentum) * p`` for every momentum parameter."""
        m = self.config.momentum
        online, shadow = self._momentum_parameters()
        torch._foreach_mul_(shadow, m)
        torch._foreach_add_(shadow, online, alpha=1.0 - m)

    def _momentum_parameters(self) -> Tuple[List[Tensor], List[Tensor]]:
        online, shadow = [], []
        for a, b in self.MOMENTUM_PAIRS:
            pa, pb = list(getattr(self, a).parameters()), list(getattr(self, b).parameters())
            online.extend(p.detach() for p in pa)
            shadow.extend(pb)
        return online, shadow

    # -------------------------------------------------------------------------------- objective
    def losses(self, images: Tensor, text: Tensor, lsr_loss: nn.Module, *, generator: Optional[torch.Generator] = None,
               pair_ids: Optional[Tensor] = None, alpha: Optional[float] = None) -> Dict[str, Tensor]:
        """ALBEF's pre-training objective for one batch, plus the LSR regularisers.

        ``lsr_loss``: an :class:`lsr_kernels.LSRLoss`; it fixes the backend (ITC uses the same one) and
        the regulariser weights (all 0: plain ALBEF). ``generator``: a CPU generator for the MLM
        masks and the hard negatives. ``pair_ids``: ``[B]`` ids of what each caption describes; pairs
        with equal ids are never hard negatives of each other. ``alpha``: the distillation weight
        (default ``config.alpha``; ALBEF ramps it up over the first epoch).

        Returns ``{"loss", "itc_loss", "itm_loss", "mlm_loss", <each regulariser term that is on, times
        its weight, as LSRLoss's output_dict has it>, "logit_scale"}``; ``loss`` is the sum of the
        others but ``logit_scale``.
        Enqueues the momentum features afterwards.
        """
        c = self.config
        b = images.shape[0]
        if b < 2:
            raise ValueError(f"images: ITM needs at least 2 pairs per batch for a negative, got batch size {b}")
        if text.dim() != 2 or text.shape[0] != b:
            raise ValueError(f"text: expected [{b}, L] token ids, got shape {tuple(text.shape)}")
        alpha = c.alpha if alpha is None else float(alpha)
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        device = images.device

        shard = _Shard(lsr_loss)
        self.clamp_temperature_()
        scale = self.scale()
        image_tokens = self.visual_encoder(images)
        text_hidden = self.text_encoder(text)
        image_feat = self.vision_proj(image_tokens[:, 0])
        text_feat = self.text_proj(text_hidden[:, 0])

        weights = {term: float(getattr(lsr_loss, attr, 0.0)) for term, attr in REGULARISER_WEIGHTS}
        separation = weights["separation_loss"] > 0
        with torch.no_grad():
            self.momentum_update()
            image_tokens_m = self.visual_encoder_m(images)
            image_feat_m = self.vision_proj_m(image_tokens_m[:, 0])
            text_hidden_m = self.text_encoder_m(text)
            text_feat_m = self.text_proj_m(text_hidden_m[:, 0])

        # ---- ITC (SPEC 2.6). The queues are cloned: they are updated in place below.
        out: Dict[str, Tensor] = {}
        # Distributed (an LSRLoss with world_size > 1): ITC takes the same placement, so the bank holds
        # every rank's momentum features (single-process ALBEF on the global batch), and the queues
        # enqueue all of them (ALBEF's concat_all_gather). The fp32 queues follow the features' dtype
        # (an enclosing autocast makes them bf16 / fp16).
        world = getattr(lsr_loss, "world_size", 1)
        if world > 1:
            itc = ITCLoss(alpha=alpha, **lsr_loss.distributed_settings())
        else:
            itc = functools.partial(itc_loss, alpha=alpha, backend=getattr(lsr_loss, "backend", "auto"))
        out["itc_loss"] = itc(image_feat, text_feat, image_feat_m, text_feat_m, scale,
                              image_queue=self.image_queue.features.to(image_feat.dtype, copy=True),
                              text_queue=self.text_queue.features.to(text_feat.dtype, copy=True))

        # ---- LSR regularisers on the unimodal features, momentum features as the views.
        regulariser = image_feat.new_zeros(())
        if any(w > 0 for w in weights.values()):
            extra = {}
            if separation:
                with torch.no_grad():
                    extra = dict(image_ind_aug=self.image_ind_proj_m(image_tokens_m[:, 0]),
                                 text_ind_aug=self.text_ind_proj_m(text_hidden_m[:, 0]))
                extra.update(image_ind=self.image_ind_proj(image_tokens[:, 0]),
                             text_ind=self.text_ind_proj(text_hidden[:, 0]))
            parts = lsr_loss(image_feat, text_feat, scale, image_aug=image_feat_m, text_aug=text_feat_m,
                             output_dict=True, **extra)
            for term in weights:
                if term in parts:  # weighted already
                    out[term] = parts[term]
                    regulariser = regulariser + parts[term]

        # ---- ITM with hard negatives, drawn from the global batch (every rank's rows).
        text_mask = padding_mask(text, c.pad_id)
        fused_pos = self.fusion(text_hidden, text_mask, image_tokens)[:, 0]
        with torch.no_grad():
            ids_all = None if pair_ids is None else shard.gather(pair_ids.to(device), with_grad=False)
            first = shard.rank * b
            neg_text = _sample_hard_negatives(scale * image_feat @ shard.gather(text_feat_m, with_grad=False).T,
                                              pair_ids, ids_all, generator, first)
            neg_image = _sample_hard_negatives(scale * text_feat @ shard.gather(image_feat_m, with_grad=False).T,
                                               pair_ids, ids_all, generator, first)
        text_hidden_all = shard.gather(text_hidden, with_grad=True)
        text_mask_all = padding_mask(shard.gather(text, with_grad=False), c.pad_id)
        image_tokens_all = shard.gather(image_tokens, with_grad=True)
        # Rows 0..B-1: each text with a hard negative image; rows B..2B-1: each image with a hard negative text.
        # index_select, not x[idx]: the latter's backward adds repeated rows with parallel atomics on a
        # multi-threaded CPU, in an order that differs between runs (a resumed run would not repeat).
        text_for_neg = torch.cat([text_hidden, text_hidden_all.index_select(0, neg_text)])
        mask_for_neg = torch.cat([text_mask, text_mask_all.index_select(0, neg_text)])
        image_for_neg = torch.cat([image_tokens_all.index_select(0, neg_image), image_tokens])
        fused_neg = self.fusion(text_for_neg, mask_for_neg, image_for_neg)[:, 0]
        itm_logits = self.itm_head(torch.cat([fused_pos, fused_neg]))
        itm_labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(device)
        out["itm_loss"] = F.cross_entropy(itm_logits.float(), itm_labels)

        # ---- MLM, distilled from the momentum model.
        masked_text, mlm_labels = mask_tokens(text, c, generator, shard=(shard.rank, shard.world))
        masked_mask = padding_mask(masked_text, c.pad_id)
        logits = self.mlm_head(self.fusion(self.text_encoder(masked_text), masked_mask, image_tokens)).float()
        with torch.no_grad():
            logits_m = self.mlm_head_m(self.fusion_m(self.text_encoder_m(masked_text), masked_mask, image_tokens_m))
            soft_labels = F.softmax(logits_m.float(), dim=-1)
        out["mlm_loss"] = _distilled_mlm_loss(logits, soft_labels, mlm_labels, alpha, shard)

        out["loss"] = out["itc_loss"] + out["itm_loss"] + out["mlm_loss"] + regulariser
        out["logit_scale"] = scale.detach()
        if world > 1:
            itc.dequeue_and_enqueue(self.image_queue, self.text_queue, image_feat_m, text_feat_m)
        else:
            self.image_queue.enqueue(image_feat_m)
            self.text_queue.enqueue(text_feat_m)
        return out


def _sample_hard_negatives(similarity: Tensor, row_ids: Optional[Tensor], col_ids: Optional[Tensor],
                           generator: torch.Generator, first_row: int = 0) -> Tensor:
    """For each row, one column drawn with probability ``softmax(similarity)`` over the columns that are
    neither the row's own pair nor of its pair id; a row with no such column draws uniformly among the
    others (same-id ones then, as nothing else is left).

    ``similarity``: ``[b, M]``, rows ``first_row .. first_row + b`` of a global batch of ``M`` pairs
    (``first_row = 0, M = b``: a single process), so row ``i``'s own pair is column ``first_row + i``.
    ``row_ids`` / ``col_ids``: the pair ids of the rows and of the columns, or ``None``.
    Gumbel-max sampling on the masked logits themselves (not the log of softmax weights, which underflow
    to 0 at a large scale and would leave a row with no candidate), with noise drawn on the CPU for the
    whole ``M x M`` batch, of which these rows keep theirs: the same draw as ``torch.multinomial`` in
    law, no device-to-host copy, the same numbers on every device and for every split of the batch
    over ranks.
    """
    b, total = similarity.shape
    device = similarity.device
    own = torch.zeros(b, total, dtype=torch.bool, device=device)
    own[torch.arange(b, device=device), first_row + torch.arange(b, device=device)] = True
    exclude = own
    if row_ids is not None:
        exclude = exclude | (row_ids.to(device)[:, None] == col_ids.to(device)[None, :])
    logits = similarity.float().masked_fill(exclude, float("-inf"))
    # no candidate left: uniform over every column but the own pair
    uniform = torch.zeros_like(logits).masked_fill(own, float("-inf"))
    logits = torch.where((~exclude).any(1, keepdim=True), logits, uniform)
    u = torch.rand(total, total, generator=generator)[first_row:first_row + b]
    gumbel = -torch.log(-torch.log(u.clamp_(1e-12, 1.0 - 1e-7).to(device)))
    return torch.argmax(logits + gumbel, dim=1)


def mask_tokens(text: Tensor, config: ALBEFConfig, generator: torch.Generator,
                shard: Tuple[int, int] = (0, 1)) -> Tuple[Tensor, Tensor]:
    """BERT masking: each word token (not pad / [CLS] / [EOS]) is chosen with ``mlm_probability``; a chosen
    token becomes ``[MASK]`` (80%), a random word (10%) or stays (10%). Returns ``(input_ids, labels)``
    with ``labels = -100`` where nothing is predicted. ``shard = (index, count)``: ``text`` is part
    ``index`` of a batch cut into ``count`` equal parts; the draws are made for the whole batch."""
    device = text.device
    index, count = shard
    b, length = text.shape
    rows = slice(index * b, (index + 1) * b)
    u = torch.rand(3, count * b, length, generator=generator)[:, rows].to(device)
    random_words = torch.randint(config.num_special_tokens, config.vocab_size, (count * b, length),
                                 generator=generator)[rows].to(device)
    special = (text == config.pad_id) | (text == config.cls_id) | (text == config.eos_id)
    chosen = (u[0] < config.mlm_probability) & ~special
    labels = text.masked_fill(~chosen, -100)
    to_mask = chosen & (u[1] < 0.8)
    to_random = chosen & ~to_mask & (u[2] < 0.5)
    input_ids = text.masked_fill(to_mask, config.mask_id)
    input_ids = torch.where(to_random, random_words, input_ids)
    return input_ids, labels


def _distilled_mlm_loss(logits: Tensor, soft_labels: Tensor, labels: Tensor, alpha: float, shard: _Shard) -> Tensor:
    """``(1 - alpha) CE(logits, labels) + alpha * CE(logits, soft_labels)`` over the predicted positions
    (0 when a batch has none, instead of ALBEF's NaN; no host sync). Over ranks: this rank's share of
    the mean over the global batch's predicted positions (its sum over the global count / ranks)."""
    predicted = labels != -100
    count = shard.sum(predicted.sum().to(logits.dtype)).clamp(min=1) / shard.world
    log_p = F.log_softmax(logits, dim=-1)
    hard = -log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    soft = -(soft_labels * log_p).sum(-1)
    per_token = (1.0 - alpha) * hard + alpha * soft
    return (per_token * predicted).sum() / count


__all__ = ["ALBEFConfig", "ALBEF", "FusionEncoder", "MLMHead", "mask_tokens", "REGULARISER_WEIGHTS"]
