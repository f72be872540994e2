"""Input checks of SPEC section 6, done once in the public API before any backend runs.

Every error names the argument and what it got, so a wrong call fails at the call site with a message
a user can act on, never with a wrong number or a crash inside a kernel. Backends may therefore
assume valid, contiguous inputs.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


#: The feature matrices an ALBEF ITC call cannot do without (the queues are optional).
ITC_REQUIRED = ("image_features", "text_features", "image_features_m", "text_features_m")

#: Largest logit scale accepted. The features are L2-normalised, so the logits are ``s * cos`` with
#: fp32 cosines rounded at ~6e-8: past ~1e6 that rounding moves logits by more than 0.06 and decides
#: the softmax (CLIP clamps ``s`` at 100, ALBEF's ``1 / temp`` is at most 1000). Far past it the fused
#: kernels' finite stand-in for -inf on padded logits (-1e30) is no longer below every real logit,
#: and near the fp32 maximum every backend overflows.
MAX_LOGIT_SCALE = 1e6

#: Largest uniformity temperature accepted. The j = k terms of L_uni are exp(-t_u * d_jj) with
#: d_jj = |x|^2 + |x|^2 - 2 <x, x>, zero only up to fp32 rounding (~1e-7): past ~1e4 that rounding
#: decides the loss (and past ~1e20 every term underflows to 0 and the log to -inf).
MAX_UNIFORMITY_T = 1e4


def _describe(x: Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(name: str, x) -> Tensor:
    """``x`` must be a dense (strided) tensor; the error names the argument and what it got."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout} ({_describe(x)}); "
                        f"call .to_dense() first")
    return x


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or NumPy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_number(name: str, value) -> float:
    """A real scalar argument (Python or NumPy number) as a Python float; anything else is a TypeError."""
    if is_real(value):
        try:
            return float(value)
        except OverflowError:  # an int past float's range
            raise ValueError(f"{name}: an integer of {int(value).bit_length()} bits is too large for a float") from None
    if isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a Python number, got a Tensor of shape {tuple(value.shape)} "
                        f"(pass float(...) of it)")
    raise TypeError(f"{name}: expected a number, got {type(value).__name__}")


def check_features(named: Dict[str, Optional[Tensor]], *, width_only: Sequence[str] = (),
                   required: Sequence[str] = ()) -> Tuple[int, int]:
    """Check a set of feature matrices; return ``(N, D)``.

    Every tensor must be a dense 2-D floating ``[N, D]`` matrix (``[K, D]`` for names in ``width_only``,
    the queues) with one dtype and one device across the set. ``None`` entries are skipped unless
    their name is in ``required``. The first entry fixes ``N``, ``D``, dtype and device.
    """
    first_name = None
    n = d = None
    dtype = device = None
    for name, x in named.items():
        if x is None:
            if name in required:
                raise TypeError(f"{name}: expected a torch.Tensor, got None (it is required)")
            continue
        check_tensor(name, x)
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D [N, D] feature matrix, got {_describe(x)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {_describe(x)}")
        if first_name is None:
            first_name, n, d, dtype, device = name, x.shape[0], x.shape[1], x.dtype, x.device
            if n == 0:
                raise ValueError(f"{name}: empty batch (N = 0), got {_describe(x)}")
            if d == 0:
                raise ValueError(f"{name}: zero feature width (D = 0), got {_describe(x)}")
            continue
        if x.dtype != dtype:
            raise TypeError(f"{name}: dtype {x.dtype} differs from {first_name}'s {dtype} (got {_describe(x)}, "
                            f"{first_name} has shape {(n, d)}; mixed dtypes: cast the features to one dtype)")
        if x.device != device:
            raise ValueError(f"{name}: device {x.device} differs from {first_name}'s {device} (got {_describe(x)}, "
                             f"{first_name} has shape {(n, d)})")
        if x.shape[1] != d:
            transposed = name in width_only and x.shape[0] == d  # ALBEF's own code keeps [D, K] queues
            hint = f"; ALBEF's queue buffers are [D, K]: pass {name}.T" if transposed else ""
            raise ValueError(f"{name}: feature width D = {x.shape[1]} does not match {first_name}'s "
                             f"D = {d} (got {_describe(x)}, {first_name} has shape {(n, d)}{hint})")
        if name not in width_only and x.shape[0] != n:
            raise ValueError(f"{name}: batch size N = {x.shape[0]} does not match {first_name}'s "
                             f"N = {n} (got {_describe(x)}, {first_name} has shape {(n, d)})")
    return n, d


def check_scale(logit_scale, like: Tensor) -> Tensor:
    """Return the logit scale as a 0-dim tensor on ``like``'s device; reject non-scalars and values
    outside ``(0, MAX_LOGIT_SCALE]``.

    ``logit_scale`` is the already-exponentiated multiplier (open_clip's convention). A Python or
    NumPy number becomes a constant tensor (fp64 for fp64 features, fp32 otherwise). The check reads
    a tensor's value (one host sync per call). A compiled graph, or a CUDA graph being captured,
    cannot raise on a value without that sync, so there an out-of-range scale becomes NaN, which makes
    the loss NaN rather than a finite wrong number; meta tensors have no value to check.
    """
    def check_value(value: float) -> None:
        if not (0 < value <= MAX_LOGIT_SCALE):
            raise ValueError(f"logit_scale: expected a finite positive multiplier of at most {MAX_LOGIT_SCALE:g} "
                             f"(already exponentiated, as open_clip passes logit_scale.exp(); CLIP clamps it "
                             f"at 100), got {value!r}")

    if is_real(logit_scale):
        value = as_number("logit_scale", logit_scale)
        check_value(value)
        compute = torch.float64 if like.dtype == torch.float64 else torch.float32
        # a fill kernel, not a host-to-device copy: no sync, and legal inside a CUDA graph capture
        return torch.full((), value, device=like.device, dtype=compute)
    if not isinstance(logit_scale, Tensor):
        raise TypeError(f"logit_scale: expected a scalar tensor or a number, got {type(logit_scale).__name__}")
    check_tensor("logit_scale", logit_scale)
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale: expected a scalar (one element), got shape {tuple(logit_scale.shape)}")
    if not logit_scale.is_floating_point():
        raise TypeError(f"logit_scale: expected a floating tensor, got dtype {logit_scale.dtype}")
    if logit_scale.device != like.device:
        raise ValueError(f"logit_scale: device {logit_scale.device} differs from the features' {like.device} "
                         f"(logit_scale has shape {tuple(logit_scale.shape)}, the features {tuple(like.shape)})")
    logit_scale = logit_scale.reshape(())
    if torch.compiler.is_compiling() or (logit_scale.is_cuda and torch.cuda.is_current_stream_capturing()):
        in_range = (logit_scale > 0) & (logit_scale <= MAX_LOGIT_SCALE)
        return torch.where(in_range, logit_scale, logit_scale.new_full((), math.nan))
    if logit_scale.device.type != "meta":
        check_value(float(logit_scale.detach()))
    return logit_scale


def check_logit_bias(logit_bias, like: Tensor) -> None:
    """open_clip's ``ClipLoss`` takes a ``logit_bias`` it adds to every logit; only a scalar cancels
    in each softmax, so only a scalar (or ``None``) may reach a loss that does not compute it."""
    if logit_bias is None or is_real(logit_bias):
        return
    if not isinstance(logit_bias, Tensor):
        raise TypeError(f"logit_bias: expected None, a number or a scalar tensor, got {type(logit_bias).__name__}")
    check_tensor("logit_bias", logit_bias)
    check_tensor("image_features", like)  # read below, before the loss validates the features
    if logit_bias.numel() != 1:
        raise ValueError(f"logit_bias: expected a scalar (one element): a bias that differs between logits "
                         f"changes the contrastive loss, which this loss does not model; got shape "
                         f"{tuple(logit_bias.shape)} for features of shape {tuple(like.shape)}")
    if logit_bias.device != like.device:
        raise ValueError(f"logit_bias: device {logit_bias.device} differs from the features' {like.device}")


def check_open_interval(name: str, value: float, low: float, high: float) -> float:
    value = as_number(name, value)
    if not (low < value < high):
        raise ValueError(f"{name}: expected a number in ({low}, {high}), got {value!r}")
    return value


def check_unit_interval(name: str, value: float) -> float:
    value = as_number(name, value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return value


def check_positive(name: str, value: float) -> float:
    value = as_number(name, value)
    if not (0.0 < value < math.inf):
        raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    return value


def check_uniformity_t(value: float) -> float:
    value = check_positive("uniformity_t", value)
    if value > MAX_UNIFORMITY_T:
        raise ValueError(f"uniformity_t: expected at most {MAX_UNIFORMITY_T:g} (the paper uses 2; beyond that the "
                         f"j = k terms of the uniformity sum are decided by rounding), got {value!r}")
    return value


def check_weight(name: str, value: float) -> float:
    value = as_number(name, value)
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name}: expected a finite weight >= 0 (0 switches the term off), got {value!r}")
    return value


def require(term: str, named: Dict[str, Optional[Tensor]]) -> None:
    """A term that is on needs its inputs: name every missing one."""
    missing = [name for name, x in named.items() if x is None]
    if missing:
        raise ValueError(f"{term} is on but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         f"missing (pass {', '.join(missing)}, or set its weight to 0)")


def check_lsr_call(features: Dict[str, Optional[Tensor]], logit_scale, sep_weight: float, bridge_weight: float,
                   gc_weight: float, bridge_t: float, uniformity_t: float):
    """Every check of :func:`lsr_kernels.lsr_loss` (single-process and distributed alike).

    ``features`` maps the eight feature names to tensors or ``None``, ``image_features`` first.
    Returns ``((sep_weight, bridge_weight, gc_weight), (bridge_t, uniformity_t), scale)``.
    """
    weights = (check_weight("sep_weight", sep_weight), check_weight("bridge_weight", bridge_weight),
               check_weight("gc_weight", gc_weight))
    params = (check_open_interval("bridge_t", bridge_t, 0.0, 1.0), check_uniformity_t(uniformity_t))
    check_features(features, required=("image_features", "text_features"))
    scale = check_scale(logit_scale, features["image_features"])
    image_aug, text_aug = features["image_aug"], features["text_aug"]
    # One view without the other would silently drop the in-modal terms: only the bridge uses
    # image_aug on its own.
    if (image_aug is None) != (text_aug is None) and not (weights[1] > 0 and text_aug is None):
        given, missing = ("image_aug", "text_aug") if text_aug is None else ("text_aug", "image_aug")
        raise ValueError(f"{given} was given without {missing}: the contrastive and geometric terms use "
                         f"the augmented views as a pair (only the bridge uses image_aug alone)")
    if weights[0] > 0:
        require("separation (sep_weight > 0)",
                {k: features[k] for k in ("image_ind", "text_ind", "image_ind_aug", "text_ind_aug")})
    if weights[1] > 0:
        require("the bridge (bridge_weight > 0)", {"image_aug": image_aug})
    return weights, params, scale


def check_info_nce_operands(a: Tensor, b: Tensor, symmetric: bool, offset) -> int:
    """The shapes of the ``info_nce`` primitive (contract in :mod:`lsr_kernels.backends`): ``a``
    ``[N, D]``; ``b`` ``[N, D]`` when ``symmetric``, else ``[M, D]`` with ``M >= N`` and the positives
    at columns ``offset .. offset + N - 1``. Returns ``offset`` as an int."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"info_nce: a and b must be [N, D] and [M, D] matrices of one width, "
                         f"got a {tuple(a.shape)}, b {tuple(b.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset: expected an int, got {type(offset).__name__}")
    n, m = a.shape[0], b.shape[0]
    if symmetric and (m != n or offset != 0):
        raise ValueError(f"info_nce: symmetric needs a square X (b [N, D] like a, offset 0), got a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}, offset {offset}")
    if not 0 <= offset <= m - n:
        raise ValueError(f"offset: expected 0 <= offset <= M - N = {m - n} (a {tuple(a.shape)}, b {tuple(b.shape)}), "
                         f"got {offset}")
    return offset


def refuse_double_backward(backend: str, primitive: str,
                           hint: str = "use backend='reference' for higher-order gradients") -> None:
    """Call first thing in a fused backward. Those backwards are written by hand (kernels, in-place
    tile arithmetic) and are not differentiable themselves: under ``create_graph=True`` fail loudly
    rather than return second derivatives that silently miss this term."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{backend}.{primitive}: double backward (create_graph=True) is not supported; "
                           f"{hint}")
