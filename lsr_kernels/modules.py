"""``nn.Module`` front ends: each owns its hyper-parameters and is one functional call thick.

``ClipLoss`` has open_clip's constructor and ``forward``, so swapping the import is the whole
migration. ``LSRLoss`` and ``ITCLoss`` take the same distributed arguments. With ``world_size > 1``
every loss computes this rank's rows against all ranks' columns through :mod:`lsr_kernels.distributed`
(whose docstring has the semantics of each ``local_loss`` / ``gather_with_grad`` combination);
``distributed_mode="ring"`` passes feature blocks around the ranks instead of gathering them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, distributed, functional
from . import _validation as V


#: The regulariser terms of :func:`lsr_kernels.lsr_loss` and the LSRLoss attribute holding each weight.
REGULARISER_WEIGHTS = (("separation_loss", "sep_weight"), ("bridge_loss", "bridge_weight"),
                       ("geometric_loss", "gc_weight"))


def _with_zero_bias_gradient(loss: Tensor, logit_bias) -> Tensor:
    """A scalar bias added to every logit cancels in each softmax, so open_clip's loss does not depend
    on it and neither do these. It stays in the graph with a zero gradient, as in open_clip: DDP
    without find_unused_parameters fails on a parameter that receives no gradient."""
    if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
        loss = loss + (logit_bias.reshape(()) * 0).to(loss.dtype)
    return loss


class _DistributedArgs(nn.Module):
    """open_clip's distributed arguments, shared by the three losses."""

    def __init__(self, local_loss: bool, gather_with_grad: bool, cache_labels: bool, rank: int,
                 world_size: int, use_horovod: bool, backend: str, distributed_mode: str = "gather",
                 process_group=None):
        super().__init__()
        if not V.is_int(world_size) or world_size < 1:
            raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
        if not V.is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, world_size = {world_size}), got {rank!r}")
        if backend not in backends.BACKENDS:  # at construction, not at the first step
            raise ValueError(f"backend: expected one of {backends.BACKENDS}, got {backend!r}")
        if use_horovod:
            raise ValueError("use_horovod: Horovod is not supported; use torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for open_clip compatibility: no labels are built
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.backend = backend
        self.distributed_mode = distributed._check_mode(distributed_mode)
        #: ``None``: the default group. Not a submodule or buffer: it is process state.
        self.process_group = process_group

    def distributed_settings(self) -> dict:
        """The constructor arguments that place this loss on the ranks (and its backend), so a second
        loss can be built the same way: ``ITCLoss(alpha=0.4, **lsr.distributed_settings())``."""
        return dict(backend=self.backend, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                    rank=self.rank, world_size=self.world_size, distributed_mode=self.distributed_mode,
                    process_group=self.process_group)

    def extra_repr(self) -> str:
        """``print(model)`` shows the hyper-parameters, and the placement when distributed."""
        fields = [f"{name}={value!r}" for name, value in self._hyper_parameters().items()]
        fields.append(f"backend={self.backend!r}")
        if self.world_size > 1:
            fields += [f"rank={self.rank}", f"world_size={self.world_size}", f"local_loss={self.local_loss}",
                       f"gather_with_grad={self.gather_with_grad}", f"distributed_mode={self.distributed_mode!r}"]
        return ", ".join(fields)

    def _hyper_parameters(self) -> dict:
        return {}

    def _distributed_kwargs(self) -> dict:
        return dict(backend=self.backend, group=self.process_group, local_loss=self.local_loss,
                    gather_with_grad=self.gather_with_grad, world_size=self.world_size, rank=self.rank)


class ClipLoss(_DistributedArgs):
    """Drop-in for ``open_clip.loss.ClipLoss``: ``(CE(s V T^T) + CE(s T V^T)) / 2`` (SPEC 2.1).

    With ``world_size > 1`` the loss and every gradient equal open_clip's for the same
    ``local_loss`` / ``gather_with_grad`` flags, without the ``N x N`` logits open_clip builds when
    ``local_loss=False``. ``local_loss=True, gather_with_grad=True`` gives DDP exactly the
    single-process update (SPEC 5).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto",
                 distributed_mode: str = "gather", process_group=None):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, backend,
                         distributed_mode, process_group)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Optional[Tensor] = None, output_dict: bool = False):
        V.check_logit_bias(logit_bias, image_features)
        if self.world_size > 1:
            loss = distributed.clip_loss(image_features, text_features, logit_scale, mode=self.distributed_mode,
                                         **self._distributed_kwargs())
        else:
            loss = functional.clip_loss(image_features, text_features, logit_scale, backend=self.backend)
        loss = _with_zero_bias_gradient(loss, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class LSRLoss(_DistributedArgs):
    """The full objective of SPEC 2.5 (see :func:`lsr_kernels.lsr_loss` for every argument).

    The weights default to the paper's (SPEC 2.5): ``sep_weight=1``, ``bridge_weight=1``,
    ``gc_weight=0.25``; a weight of 0 switches its term off and makes its inputs optional.

    Distributed (``world_size > 1``): pass ``local_loss=True, gather_with_grad=True`` for SPEC 5 (the
    mean over ranks of the returned values is the single-process loss and DDP's averaged gradients
    are the single-process ones). ``local_loss=False`` returns the global value on every rank;
    with ``gather_with_grad=False`` as well, the feature gradients are ``1/W`` of that (open_clip's
    default flags behave so). ``local_loss=True, gather_with_grad=False`` is rejected.
    """

    def __init__(self, sep_weight: float = 1.0, bridge_weight: float = 1.0, gc_weight: float = 0.25,
                 bridge_t: float = 0.25, uniformity_t: float = 2.0, backend: str = "auto",
                 local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, distributed_mode: str = "gather",
                 process_group=None):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, backend,
                         distributed_mode, process_group)
        if world_size > 1 and local_loss and not gather_with_grad:
            raise ValueError(
                "local_loss=True with gather_with_grad=False: in that open_clip combination the gathered "
                "columns are constants and a feature gets only its own rows' gradient, which is not the "
                "gradient of the objective (and has no meaning for the uniformity and Gram terms). Use "
                "gather_with_grad=True (SPEC 5), or ClipLoss for open_clip's exact behaviour")
        self.sep_weight = V.check_weight("sep_weight", sep_weight)
        self.bridge_weight = V.check_weight("bridge_weight", bridge_weight)
        self.gc_weight = V.check_weight("gc_weight", gc_weight)
        self.bridge_t = V.check_open_interval("bridge_t", bridge_t, 0.0, 1.0)
        self.uniformity_t = V.check_uniformity_t(uniformity_t)

    def _hyper_parameters(self) -> dict:
        return dict(sep_weight=self.sep_weight, bridge_weight=self.bridge_weight, gc_weight=self.gc_weight,
                    bridge_t=self.bridge_t, uniformity_t=self.uniformity_t)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Optional[Tensor] = None, output_dict: bool = False, *,
                image_aug: Optional[Tensor] = None, text_aug: Optional[Tensor] = None,
                image_ind: Optional[Tensor] = None, text_ind: Optional[Tensor] = None,
                image_ind_aug: Optional[Tensor] = None, text_ind_aug: Optional[Tensor] = None):
        """The total, or with ``output_dict=True`` open_clip's form: each term as it enters the total
        (``contrastive_loss`` and, for the terms that are on, ``separation_loss``, ``bridge_loss``,
        ``geometric_loss`` times their weights), so that ``sum(losses.values())``, as open_clip's
        training loop computes it, is the total. (:func:`lsr_kernels.lsr_loss` returns the total and
        the unweighted terms.) ``logit_bias``: as :class:`ClipLoss`'s (a scalar that cancels)."""
        V.check_logit_bias(logit_bias, image_features)
        kwargs = dict(image_aug=image_aug, text_aug=text_aug, image_ind=image_ind, text_ind=text_ind,
                      image_ind_aug=image_ind_aug, text_ind_aug=text_ind_aug, sep_weight=self.sep_weight,
                      bridge_weight=self.bridge_weight, gc_weight=self.gc_weight, bridge_t=self.bridge_t,
                      uniformity_t=self.uniformity_t)
        if self.world_size > 1:
            out = distributed.lsr_loss(image_features, text_features, logit_scale, mode=self.distributed_mode,
                                       **kwargs, **self._distributed_kwargs())
        else:
            out = functional.lsr_loss(image_features, text_features, logit_scale, backend=self.backend, **kwargs)
        if not output_dict:
            return _with_zero_bias_gradient(out["loss"], logit_bias)
        parts = {"contrastive_loss": _with_zero_bias_gradient(out["contrastive_loss"], logit_bias)}
        parts.update((term, getattr(self, weight) * out[term]) for term, weight in REGULARISER_WEIGHTS if term in out)
        return parts


class ITCLoss(_DistributedArgs):
    """ALBEF's image-text contrastive loss with momentum distillation and queues (SPEC 2.6).

    Distributed (``world_size > 1``): every rank's momentum features, gathered without gradient, and
    then the queue form the bank; each rank's rows are contrasted against it, so the ranks together
    compute single-process ALBEF on the global batch (SPEC 5). (ALBEF's own DDP code contrasts each
    rank's rows with its local momentum features and the queue only, and gathers for the queue.) The
    queues must be identical on every rank: fill them with :meth:`dequeue_and_enqueue` (or
    :meth:`FeatureQueue.enqueue_gathered`). ``local_loss=True`` returns this rank's share (the mean
    over ranks is the single-process loss);
    ``distributed_mode`` has no effect (the bank is always gathered: it carries no gradient and the
    queue already holds ``K`` rows on every rank).
    """

    def __init__(self, alpha: float = 0.4, backend: str = "auto", local_loss: bool = False,
                 gather_with_grad: bool = False, cache_labels: bool = False, rank: int = 0,
                 world_size: int = 1, use_horovod: bool = False, distributed_mode: str = "gather",
                 process_group=None):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, backend,
                         distributed_mode, process_group)
        self.alpha = V.check_unit_interval("alpha", alpha)

    def _hyper_parameters(self) -> dict:
        return dict(alpha=self.alpha)

    def forward(self, image_features: Tensor, text_features: Tensor, image_features_m: Tensor,
                text_features_m: Tensor, logit_scale: Tensor, *, image_queue: Optional[Tensor] = None,
                text_queue: Optional[Tensor] = None, output_dict: bool = False):
        if self.world_size > 1:
            loss = distributed.itc_loss(image_features, text_features, image_features_m, text_features_m,
                                        logit_scale, image_queue=image_queue, text_queue=text_queue,
                                        alpha=self.alpha, **self._distributed_kwargs())
        else:
            loss = functional.itc_loss(image_features, text_features, image_features_m, text_features_m,
                                       logit_scale, image_queue=image_queue, text_queue=text_queue,
                                       alpha=self.alpha, backend=self.backend)
        return {"itc_loss": loss} if output_dict else loss

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_queue: "FeatureQueue", text_queue: "FeatureQueue",
                            image_features_m: Tensor, text_features_m: Tensor) -> None:
        """ALBEF's ``_dequeue_and_enqueue``: append every rank's momentum features (in rank order) to
        both queues, identically on every rank; call it after the loss, as ALBEF does."""
        for name, queue in (("image_queue", image_queue), ("text_queue", text_queue)):
            if not isinstance(queue, FeatureQueue):
                raise TypeError(f"{name}: expected a FeatureQueue (its buffer is queue.features), "
                                f"got {type(queue).__name__}")
        V.check_features({"image_features_m": image_features_m, "text_features_m": text_features_m},
                         required=("image_features_m", "text_features_m"))
        for name, rows, queue_name, queue in (("image_features_m", image_features_m, "image_queue", image_queue),
                                              ("text_features_m", text_features_m, "text_queue", text_queue)):
            if rows.shape[1] != queue.features.shape[1]:
                raise ValueError(f"{name}: feature width D = {rows.shape[1]} does not match {queue_name}'s "
                                 f"D = {queue.features.shape[1]} (got shape {tuple(rows.shape)})")
        group = self.process_group if self.world_size > 1 else False
        image_queue.enqueue_gathered(image_features_m, group=group)
        text_queue.enqueue_gathered(text_features_m, group=group)


class FeatureQueue(nn.Module):
    """A FIFO of the last ``size`` momentum feature rows (ALBEF's queue), correct at the wrap-around.

    ``features`` is a ``[size, dim]`` buffer initialised, as ALBEF does, with random L2-normalised rows;
    ``ptr`` is where the next row goes. Both are buffers, so they follow ``.to()`` and checkpoints.
    ``enqueue`` never reads ``ptr`` on the host (no device sync).
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not V.is_int(size) or size < 1:
            raise ValueError(f"size: expected an int >= 1, got {size!r}")
        if not V.is_int(dim) or dim < 1:
            raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
        if dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of {V.FLOAT_DTYPES} (the queue holds features), got {dtype!r}")
        size, dim = int(size), int(dim)
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
        V.check_tensor("rows", rows)
        if rows.dim() != 2 or rows.shape[1] != self.features.shape[1]:
            raise ValueError(f"rows: expected [B, {self.features.shape[1]}], got shape {tuple(rows.shape)}")
        if not rows.is_floating_point():
            raise TypeError(f"rows: expected floating features, got dtype {rows.dtype}")
        if rows.device != self.features.device:
            raise ValueError(f"rows: device {rows.device} differs from the queue's {self.features.device} "
                             f"(move the queue with .to(), or the rows)")
        b = rows.shape[0]
        if b == 0:
            return
        kept = min(b, self.size)
        # Row i of the kept tail is the (b - kept + i)-th row appended after ptr.
        slots = (self.ptr + (b - kept) + torch.arange(kept, device=self.ptr.device)) % self.size
        self.features.index_copy_(0, slots, rows[b - kept:].to(self.features.dtype))
        self.ptr.copy_((self.ptr + b) % self.size)

    @torch.no_grad()
    def enqueue_gathered(self, rows: Tensor, group=None) -> None:
        """Append every rank's ``rows`` (``[B, dim]``, the same B on every rank) in rank order, so the
        queue stays identical on every rank (ALBEF's ``concat_all_gather`` before enqueueing).

        ``group``: the process group (``None``: the default one); ``False``, or torch.distributed not
        initialised, or a group of one rank: the same as :meth:`enqueue`. Ranks holding different
        shapes raise a ``ValueError`` on every rank (one small collective and a host sync)."""
        if group is False or not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_world_size(group) == 1:
            self.enqueue(rows)
            return
        # Shapes are compared across ranks before the gather; a width that is wrong on every rank
        # fails in enqueue on every rank.
        self.enqueue(distributed.gather_for_queue(rows, group))
