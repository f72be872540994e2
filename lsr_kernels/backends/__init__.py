"""Backends and the one place where ``backend="auto"`` is resolved.

A *fast* backend (``chunked``, ``triton``, ``cuda``) is a module that provides three primitives; the
composition of the SPEC terms out of them lives once, in :mod:`lsr_kernels.composite`. The
``reference`` backend is :mod:`lsr_kernels.reference` itself (it materialises every matrix and is the
oracle the others are tested against).

Primitive contract (every fast backend, every dtype fp32/fp16/bf16; inputs already validated and
contiguous; ``scale`` is a 0-dim floating tensor on the features' device that may require grad;
the returned loss is a 0-dim **float32** tensor; gradients come back in each input's own dtype):

``info_nce(a, b, scale, symmetric, offset=0) -> Tensor``
    ``a``, ``b``: ``[N, D]``. With ``X = scale * a @ b.T``:
    ``symmetric=False``: ``CE(X)``; ``symmetric=True``: ``(CE(X) + CE(X.T)) / 2``,
    where ``CE(X) = mean_i -log softmax(X)[i, i]``. Gradients for ``a``, ``b`` and ``scale``.
    ``symmetric=False`` also takes a rectangular ``b``: ``[M, D]`` with ``M >= N``, the positive of
    row ``i`` at column ``offset + i`` (``0 <= offset <= M - N``): ``mean_i -log softmax(X_i)[offset + i]``.
    That is one rank's rows against every rank's gathered columns (:mod:`lsr_kernels.distributed`).

``exp_gram_sum(x, t) -> Tensor``
    ``x``: ``[N, D]``, ``t``: python float > 0.
    ``sum_{j,k} exp(-t * ||x_j - x_k||^2)`` with ``||x_j - x_k||^2 = |x_j|^2 + |x_k|^2 - 2 <x_j, x_k>``
    (the pair ``j = k`` included). Gradient for ``x``. Symmetric: only tiles on or above the diagonal.

``itc_soft_ce(q, q_m, bank, scale, alpha) -> Tensor``
    ``q``, ``q_m``: ``[N, D]``, ``bank``: ``[M, D]`` with ``M >= N`` whose first ``N`` rows are the
    positives (row ``i`` of ``q`` pairs with row ``i`` of ``bank``); ``alpha`` a python float in [0, 1].
    ``P = softmax(scale * q @ bank.T)``, ``Y = alpha * softmax(scale * q_m @ bank.T) + (1 - alpha) * I``
    (``Y`` is a constant: no gradient through the soft targets, as in ALBEF where they are computed
    under ``no_grad``), loss ``= -(1/N) sum_ij Y_ij log P_ij``. Gradients for ``q`` and ``scale`` only.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Optional, Tuple

import torch

#: Every backend name the public API accepts.
BACKENDS = ("auto", "reference", "chunked", "triton", "cuda")

#: The backends that implement the three primitives (module of the same name in this package).
FAST_BACKENDS = ("chunked", "triton", "cuda")


#: The oldest Triton that compiles the triton backend's kernels: ``tl.range(flatten=...)`` came in 3.3,
#: fp64 ``tl.dot`` (the gradcheck dtype) in 3.5, which torch 2.9 ships.
MIN_TRITON = (3, 5)


def release(version: str) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of a version string such as ``"3.5.1+git1a2b"``; ``None`` when it is not a
    release number (a source build)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def triton_unusable_reason() -> Optional[str]:
    """``None`` when the ``triton`` backend can run in this environment, else why not."""
    try:
        import triton  # (an import statement, not importlib: torch.compile traces it)
    except Exception as exc:  # an absent or broken Triton only means "not this backend"
        return f"Triton does not import ({type(exc).__name__}: {exc})"
    found = release(triton.__version__)
    if found is not None and found < MIN_TRITON:  # (a source build is taken as recent enough)
        return (f"Triton {triton.__version__} is installed; the kernels need Triton >= "
                f"{MIN_TRITON[0]}.{MIN_TRITON[1]} (torch >= 2.9 brings it)")
    return None


def _triton_usable() -> bool:
    return triton_unusable_reason() is None


def _usable(name: str) -> bool:
    if name == "triton":
        return _triton_usable()
    if name == "cuda":
        from . import cuda

        return cuda.HAS_CUDA_EXT
    return name == "chunked"


def lsr_op(views: bool, separation: bool, bridge: bool, geometric: bool) -> str:
    """The benchmark op (``benchmarks/ops.py``) whose timings stand for an ``lsr_loss`` call."""
    if views or separation or bridge:
        return "full"
    return "clip_gc" if geometric else "clip"


def measured_ranking(table, device_name: str, capability: str, op: str, dtype: str, n: int, d: int,
                     k: int = 0) -> tuple:
    """The backends fastest first for the closest measured shape of ``op`` in ``dtype`` on this GPU.

    ``table``: entries of :mod:`lsr_kernels.backends.auto_choice`. Entries of the same device name
    are preferred to others of the same compute capability; among them the shape nearest in
    ``log N``, ``log D``, ``log(K + 1)`` wins (the later measurement on a tie). ``()`` when nothing
    of this op and dtype was measured on such a GPU.
    """
    def distance(entry):
        return (abs(math.log(entry["N"] / max(n, 1))) + abs(math.log(entry["D"] / max(d, 1)))
                + abs(math.log((entry["K"] + 1) / (k + 1))))

    for same in (lambda e: e["device"] == device_name, lambda e: e["capability"] == capability):
        found = [e for e in table if e["op"] == op and e["dtype"] == dtype and same(e)]
        if found:
            best = min(reversed(found), key=distance)  # min keeps the first: the latest on a tie
            return tuple(best["ranking"])
    return ()


def resolve(backend: str, device: torch.device, op: Optional[str] = None, dtype: Optional[torch.dtype] = None,
            shape: Tuple[int, int, int] = (0, 0, 0)) -> str:
    """The selection rule for ``backend="auto"``, the only one in the library.

    - CUDA device: the fastest usable backend that ``benchmarks`` measured on this GPU (or one of its
      compute capability) for ``op`` (``"clip"``, ``"clip_gc"``, ``"full"`` or ``"itc"``) in this
      ``dtype`` at the shape nearest ``shape = (N, D, K)``: the table
      :mod:`lsr_kernels.backends.auto_choice`, written by ``python -m benchmarks choose-auto``.
      Without a measurement: ``triton`` when Triton (>= :data:`MIN_TRITON`) imports, else ``chunked``.
    - any other device (CPU, MPS, ...): ``chunked``.
    ``reference`` is never chosen automatically: it materialises N x N matrices.
    An explicit name is returned unchanged (after checking that it is a known name).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "chunked"
    if op is not None and dtype is not None:
        from .auto_choice import MEASURED

        if MEASURED:
            name, capability = _gpu_identity(device)
            dtype_name = str(dtype).replace("torch.", "")
            for choice in measured_ranking(MEASURED, name, capability, op, dtype_name, *shape):
                if _usable(choice):
                    return choice
    return "triton" if _triton_usable() else "chunked"


def resolve_lsr_call(backend: str, features: dict, weights: Tuple[float, float, float]) -> str:
    """:func:`resolve` for an ``lsr_loss`` call: its features by API name, its (sep, bridge, gc) weights."""
    image = features["image_features"]
    views = features.get("image_aug") is not None and features.get("text_aug") is not None
    op = lsr_op(views, *(w > 0 for w in weights))
    return _check_placement(resolve(backend, image.device, op, image.dtype, (*image.shape, 0)), features)


def resolve_itc_call(backend: str, features: dict) -> str:
    """:func:`resolve` for an ``itc_loss`` call: its features by API name (the longer queue is K)."""
    image = features["image_features"]
    queues = [features.get(name) for name in ("image_queue", "text_queue")]
    k = max([q.shape[0] for q in queues if q is not None] + [0])  # (Dynamo before torch 2.11: no default=)
    return _check_placement(resolve(backend, image.device, "itc", image.dtype, (*image.shape, k)), features)


def _check_placement(name: str, features: dict) -> str:
    """Refuse features that a kernel backend cannot run on, naming the API argument (the primitives'
    own checks would name their internal operands); return ``name``."""
    if name in ("triton", "cuda"):
        for arg, x in features.items():
            if x is None:
                continue
            if name == "cuda" and not x.is_cuda:
                raise ValueError(f"{arg}: backend='cuda' needs CUDA tensors, got device {x.device} "
                                 f"(shape {tuple(x.shape)}); on CPU use backend='chunked'")
            if name == "triton" and _triton_usable():
                from .triton._common import check_device

                check_device(arg, x)
    return name


def _gpu_identity(device: torch.device) -> Tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def primitives(backend: str) -> ModuleType:
    """The module implementing the three primitives for a resolved fast backend name."""
    # Import statements rather than importlib.import_module, which torch.compile refuses to trace
    # (fullgraph=True would fail on it).
    if backend == "chunked":
        from . import chunked as module
    elif backend == "triton":
        from . import triton as module
    elif backend == "cuda":
        from . import cuda as module
    else:
        raise ValueError(f"backend: {backend!r} has no primitives (expected one of {FAST_BACKENDS})")
    return module
