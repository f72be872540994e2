"""``nn.Module`` front ends: each owns its hyper-parameters and is one functional call thick.

``ClipLoss`` has open_clip's constructor and ``forward``, so swapping the import is the whole
migration. ``LSRLoss`` and ``ITCLoss`` take the same distributed arguments.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional
from . import _validation as V


class _DistributedArgs(nn.Module):
    """open_clip's distributed arguments, shared by the three losses."""

    def __init__(self, local_loss: bool, gather_with_grad: bool, cache_labels: bool, rank: int,
                 world_size: int, use_horovod: bool, backend: str):
        super().__init__()
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, world_size = {world_size}), got {rank!r}")
        if use_horovod:
            raise ValueError("use_horovod: Horovod is not supported; use torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for open_clip compatibility: no labels are built
        self.rank = rank
        self.world_size = world_size
        self.backend = backend

    def _single_process_only(self) -> None:
        if self.world_size > 1:
            raise NotImplementedError(
                f"world_size = {self.world_size}: multi-process losses are not implemented yet "
                f"(tracked as the distributed issue); run with world_size = 1")


class ClipLoss(_DistributedArgs):
    """Drop-in for ``open_clip.loss.ClipLoss``: ``(CE(s V T^T) + CE(s T V^T)) / 2`` (SPEC 2.1)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, backend)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Optional[Tensor] = None, output_dict: bool = False):
        # A scalar bias added to every logit cancels in each softmax: open_clip's loss does not
        # depend on it, and neither does this one.
        self._single_process_only()
        loss = functional.clip_loss(image_features, text_features, logit_scale, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class LSRLoss(_DistributedArgs):
    """The full objective of SPEC 2.5 (see :func:`lsr_kernels.lsr_loss` for every argument).

    Weights default to 0 (plain CLIP); the paper uses ``sep_weight=1``, ``bridge_weight=1``,
    ``gc_weight=0.25``.
    """

    def __init__(self, sep_weight: float = 0.0, bridge_weight: float = 0.0, gc_weight: float = 0.0,
                 bridge_t: float = 0.25, uniformity_t: float = 2.0, backend: str = "auto",
                 local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, backend)
        self.sep_weight = V.check_weight("sep_weight", sep_weight)
        self.bridge_weight = V.check_weight("bridge_weight", bridge_weight)
        self.gc_weight = V.check_weight("gc_weight", gc_weight)
        self.bridge_t = V.check_open_interval("bridge_t", bridge_t, 0.0, 1.0)
        self.uniformity_t = V.check_positive("uniformity_t", uniformity_t)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
                image_aug: Optional[Tensor] = None, text_aug: Optional[Tensor] = None,
                image_ind: Optional[Tensor] = None, text_ind: Optional[Tensor] = None,
                image_ind_aug: Optional[Tensor] = None, text_ind_aug: Optional[Tensor] = None,
                output_dict: bool = False):
        self._single_process_only()
        out = functional.lsr_loss(
            image_features, text_features, logit_scale, image_aug=image_aug, text_aug=text_aug,
            image_ind=image_ind, text_ind=text_ind, image_ind_aug=image_ind_aug, text_ind_aug=text_ind_aug,
            sep_weight=self.sep_weight, bridge_weight=self.bridge_weight, gc_weight=self.gc_weight,
            bridge_t=self.bridge_t, uniformity_t=self.uniformity_t, backend=self.backend)
        return out if output_dict else out["loss"]


class ITCLoss(_DistributedArgs):
    """ALBEF's image-text contrastive loss with momentum distillation and queues (SPEC 2.6)."""

    def __init__(self, alpha: float = 0.4, backend: str = "auto", local_loss: bool = False,
                 gather_with_grad: bool = False, cache_labels: bool = False, rank: int = 0,
                 world_size: int = 1, use_horovod: bool = False):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, backend)
        self.alpha = V.check_unit_interval("alpha", alpha)

    def forward(self, image_features: Tensor, text_features: Tensor, image_features_m: Tensor,
                text_features_m: Tensor, logit_scale: Tensor, *, image_queue: Optional[Tensor] = None,
                text_queue: Optional[Tensor] = None, output_dict: bool = False):
        self._single_process_only()
        loss = functional.itc_loss(image_features, text_features, image_features_m, text_features_m,
                                   logit_scale, image_queue=image_queue, text_queue=text_queue,
                                   alpha=self.alpha, backend=self.backend)
        return {"itc_loss": loss} if output_dict else loss


class FeatureQueue(nn.Module):
    """A FIFO of the last ``size`` momentum feature rows (ALBEF's queue), correct at the wrap-around.

    ``features`` is a ``[size, dim]`` buffer initialised, as ALBEF does, with random L2-normalised rows;
    ``ptr`` is where the next row goes. Both are buffers, so they follow ``.to()`` and checkpoints.
    ``enqueue`` never reads ``ptr`` on the host (no device sync).
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected an int >= 1, got {size!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
        init = torch.randn(size, dim, generator=generator, dtype=torch.float32)
        self.register_buffer("features", F.normalize(init, dim=1).to(device=device, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def enqueue(self, rows: Tensor) -> None:
        """Append ``rows`` ``[B, dim]`` (any B >= 0), overwriting the oldest; same result as adding
        them one by one. When ``B > size`` only the last ``size`` rows stay."""
        if rows.dim() != 2 or rows.shape[1] != self.features.shape[1]:
            raise ValueError(f"rows: expected [B, {self.features.shape[1]}], got shape {tuple(rows.shape)}")
        b = rows.shape[0]
        if b == 0:
            return
        kept = min(b, self.size)
        # Row i of the kept tail is the (b - kept + i)-th row appended after ptr.
        slots = (self.ptr + (b - kept) + torch.arange(kept, device=self.ptr.device)) % self.size
        self.features.index_copy_(0, slots, rows[b - kept:].to(self.features.dtype))
        self.ptr.copy_((self.ptr + b) % self.size)
