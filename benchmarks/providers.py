"""Who computes each op: the lsr backends through the public API, and the baselines.

=================  =================================================  ==========  ===============
provider           what is called                                     ops         devices
=================  =================================================  ==========  ===============
reference          ``lsr_kernels.*_loss(..., backend="reference")``   all         cpu, cuda
compiled           ``torch.compile`` of the reference terms            all         cpu, cuda
open_clip          ``open_clip.loss.ClipLoss(cache_labels=True)``      clip        cpu, cuda
inf_cl             Inf-CL's ``cal_flash_loss`` in both directions      clip        cuda
chunked            ``lsr_kernels.*_loss(..., backend="chunked")``      all         cpu, cuda
triton             ``lsr_kernels.*_loss(..., backend="triton")``       all         cuda
cuda               ``lsr_kernels.*_loss(..., backend="cuda")``         all         cuda
=================  =================================================  ==========  ===============

A provider that cannot run here (package or backend missing, extension not built, wrong device)
is *recorded* as unavailable with the reason, never silently dropped. Imports are lazy: nothing here
imports triton, open_clip or inf_cl until a provider is asked about.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from . import ops as O

LossFn = Callable[[], torch.Tensor]

#: Order in which suites run providers: the library's fused paths first, so that a stage cut short by
#: its time limit still has them; torch.compile last (its compile time is the longest).
ORDER = ("triton", "cuda", "chunked", "inf_cl", "open_clip", "reference", "compiled")
LSR_BACKENDS = ("reference", "chunked", "triton", "cuda")
#: Providers that keep extra memory O(N D): the largest-N search goes far for them.
FUSED = ("triton", "cuda", "chunked", "inf_cl")
#: Providers that materialise N x N logits: hopeless shapes are recorded as OOM without running.
MATERIALISING = ("reference", "compiled", "open_clip")


def _import_reason(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is as unavailable as a missing one
        return f"cannot import {module}: {type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------------- loss builders
def _lsr_api(backend: str, op: str, x: O.Inputs) -> LossFn:
    import lsr_kernels

    f, s = x.features, x.scale
    v, t = f["image_features"], f["text_features"]
    if op == "clip":
        return lambda: lsr_kernels.clip_loss(v, t, s, backend=backend)
    if op == "clip_gc":
        return lambda: lsr_kernels.lsr_loss(v, t, s, sep_weight=0.0, bridge_weight=0.0, gc_weight=O.GC_WEIGHT,
                                            backend=backend)["loss"]
    if op == "full":
        rest = {k: f[k] for k in f if k not in ("image_features", "text_features")}
        return lambda: lsr_kernels.lsr_loss(v, t, s, **rest, **O.FULL_WEIGHTS, backend=backend)["loss"]
    if op == "itc":
        return lambda: lsr_kernels.itc_loss(v, t, f["image_features_m"], f["text_features_m"], s,
                                            image_queue=f.get("image_queue"), text_queue=f.get("text_queue"),
                                            alpha=O.ITC_ALPHA, backend=backend)
    raise ValueError(f"op: {op!r}")


def reference_objective(op: str) -> Callable:
    """The reference computation of ``op`` as one function of ``(features, scale)``: the same terms
    as ``backend="reference"`` minus the input checks (whose host sync would break a compiled graph)."""
    from lsr_kernels import reference as R

    def clip(f, s):
        return R.contrastive_loss(f["image_features"], f["text_features"], s)

    def clip_gc(f, s):
        v, t = f["image_features"], f["text_features"]
        return R.contrastive_loss(v, t, s) + O.GC_WEIGHT * R.geometric_loss(v, t)

    def full(f, s):
        terms = R.lsr_terms(f["image_features"], f["text_features"], s, image_aug=f["image_aug"],
                            text_aug=f["text_aug"], image_ind=f["image_ind"], text_ind=f["text_ind"],
                            image_ind_aug=f["image_ind_aug"], text_ind_aug=f["text_ind_aug"],
                            separation=True, bridge=True, geometric=True)
        w = O.FULL_WEIGHTS
        return (terms["contrastive_loss"] + w["sep_weight"] * terms["separation_loss"]
                + w["bridge_weight"] * terms["bridge_loss"] + w["gc_weight"] * terms["geometric_loss"])

    def itc(f, s):
        return R.itc_loss(f["image_features"], f["text_features"], f["image_features_m"], f["text_features_m"],
                          s, f.get("image_queue"), f.get("text_queue"), O.ITC_ALPHA)

    return {"clip": clip, "clip_gc": clip_gc, "full": full, "itc": itc}[op]


def _compiled(op: str, x: O.Inputs) -> LossFn:
    # A fresh Dynamo cache per measurement: sweeps over N would otherwise hit the recompile limit
    # and silently fall back to eager. Static shapes: each N is its own specialised graph.
    torch._dynamo.reset()
    compiled = torch.compile(reference_objective(op), dynamic=False)
    f, s = x.features, x.scale
    return lambda: compiled(f, s)


#: Wheels that travel with the tree to the offline GPU machine (git-ignored; see scripts/gpu_check.sh).
WHEELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wheels")
_OPEN_CLIP_LOSS = None


def open_clip_loss_module():
    """open_clip's ``loss`` module: from the installed package, else ``open_clip/loss.py`` read straight
    out of an ``open_clip_torch`` wheel in :data:`WHEELS_DIR`. The offline GPU machine lacks the
    package's import-time dependencies (torchvision, ftfy, regex, huggingface_hub); ``loss.py`` itself
    needs only torch, so the very code open_clip users run is what gets timed."""
    global _OPEN_CLIP_LOSS
    if _OPEN_CLIP_LOSS is not None:
        return _OPEN_CLIP_LOSS
    try:
        _OPEN_CLIP_LOSS = importlib.import_module("open_clip.loss")
        return _OPEN_CLIP_LOSS
    except Exception as exc:  # a broken install is as unavailable as a missing one
        installed_error = f"{type(exc).__name__}: {exc}"
    wheels = sorted(f for f in os.listdir(WHEELS_DIR) if f.startswith("open_clip_torch-") and f.endswith(".whl")) \
        if os.path.isdir(WHEELS_DIR) else []
    if not wheels:
        raise ImportError(f"cannot import open_clip.loss ({installed_error}) and no open_clip_torch wheel "
                          f"in {WHEELS_DIR}")
    with zipfile.ZipFile(os.path.join(WHEELS_DIR, wheels[-1])) as wheel:
        source = wheel.read("open_clip/loss.py")
    path = os.path.join(tempfile.mkdtemp(prefix="open_clip_loss_"), "open_clip_loss.py")
    with open(path, "wb") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("open_clip_loss_from_wheel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SOURCE = wheels[-1]
    _OPEN_CLIP_LOSS = module
    return module


def _open_clip(op: str, x: O.Inputs) -> LossFn:
    loss = open_clip_loss_module().ClipLoss(cache_labels=True)  # as open_clip's training builds it
    v, t = x.features["image_features"], x.features["text_features"]
    return lambda: loss(v, t, x.scale)


def inf_cl_head_dim(d: int) -> Optional[int]:
    """Inf-CL views each row as heads of 16..256 columns (the dot products sum over heads)."""
    for head_dim in (256, 128, 64, 32, 16):
        if d % head_dim == 0:
            return head_dim
    return None


def _inf_cl(op: str, x: O.Inputs) -> LossFn:
    # inf_cl.cal_inf_loss wraps the scale in GradientGather, whose backward all-reduces and so needs
    # an initialised process group; on one GPU it then calls exactly cal_flash_loss(...).mean(),
    # which is what is timed here. Inf-CLIP's README averages the two directions as below.
    from inf_cl import cal_flash_loss

    v, t = x.features["image_features"], x.features["text_features"]
    head_dim = inf_cl_head_dim(v.shape[1])
    s = x.scale
    return lambda: (cal_flash_loss(v, t, scale=s, head_dim=head_dim).mean()
                    + cal_flash_loss(t, v, scale=s, head_dim=head_dim).mean()) / 2


# ------------------------------------------------------------------------------------ providers
@dataclass(frozen=True)
class Provider:
    name: str
    ops: Tuple[str, ...]
    devices: Tuple[str, ...]
    description: str

    def unavailable_reason(self, op: str, device_type: str, d: Optional[int] = None) -> Optional[str]:
        """Why this provider cannot run ``op`` on ``device_type`` here, or ``None`` when it can."""
        if op not in self.ops:
            return f"{self.name} does not compute op {op!r} (only {', '.join(self.ops)})"
        if device_type not in self.devices:
            if self.name == "triton" and device_type == "cpu":
                return "Triton runs on CPU only under its interpreter, which is never timed"
            return f"{self.name} runs on {' and '.join(self.devices)} only, not {device_type}"
        if self.name in LSR_BACKENDS[1:]:
            # (lsr_kernels.backends.triton does not import without a Triton recent enough for it)
            reason = _import_reason(f"lsr_kernels.backends.{self.name}")
            if reason:
                return f"backend {self.name!r} is unusable here ({reason})"
            if self.name == "cuda":
                import lsr_kernels

                if not lsr_kernels.HAS_CUDA_EXT and os.environ.get("LSR_BENCH_CUDA_JIT") == "1":
                    # scripts/gpu_check.sh's build stage fell back to load_jit(): its cached build loads here
                    from lsr_kernels.backends import cuda as cuda_backend

                    try:
                        cuda_backend.load_jit()
                    except Exception as exc:
                        return f"LSR_BENCH_CUDA_JIT=1 but load_jit() failed: {type(exc).__name__}: {exc}"
                if not lsr_kernels.HAS_CUDA_EXT:
                    return ("CUDA extension not built (LSR_BUILD_CUDA=1 pip install --no-build-isolation -e ., "
                            "or lsr_kernels.backends.cuda.load_jit(), or LSR_BENCH_CUDA_JIT=1 to load_jit() here)")
            return None
        if self.name == "open_clip":
            try:
                open_clip_loss_module()
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return None
        if self.name == "inf_cl":
            if d is not None and inf_cl_head_dim(d) is None:
                return f"Inf-CL needs D divisible by 16, got D = {d}"
            return _import_reason("inf_cl")
        if self.name == "compiled" and not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        return None

    def build(self, op: str, inputs: O.Inputs) -> LossFn:
        """A zero-argument function returning the scalar loss of ``op`` on ``inputs``."""
        if self.name in LSR_BACKENDS:
            return _lsr_api(self.name, op, inputs)
        return {"compiled": _compiled, "open_clip": _open_clip, "inf_cl": _inf_cl}[self.name](op, inputs)


_ALL_OPS = O.OPS
PROVIDERS = {p.name: p for p in (
    Provider("reference", _ALL_OPS, ("cpu", "cuda"), "eager reference through the public API"),
    Provider("compiled", _ALL_OPS, ("cpu", "cuda"), "torch.compile of the reference terms"),
    Provider("open_clip", ("clip",), ("cpu", "cuda"), "open_clip.loss.ClipLoss"),
    Provider("inf_cl", ("clip",), ("cuda",), "Inf-CL (cal_flash_loss, both directions)"),
    Provider("chunked", _ALL_OPS, ("cpu", "cuda"), "lsr chunked backend (pure PyTorch, O(N D))"),
    Provider("triton", _ALL_OPS, ("cuda",), "lsr Triton backend"),
    Provider("cuda", _ALL_OPS, ("cuda",), "lsr CUDA C++ backend"),
)}


def get(name: str) -> Provider:
    if name not in PROVIDERS:
        raise ValueError(f"provider: expected one of {tuple(PROVIDERS)}, got {name!r}")
    return PROVIDERS[name]


def ordered(names) -> list:
    """``names`` in :data:`ORDER`."""
    names = list(names)
    for name in names:
        get(name)
    return sorted(names, key=ORDER.index)
