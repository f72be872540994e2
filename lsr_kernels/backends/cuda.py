"""The ``cuda`` backend: hand-written CUDA C++ kernels (``csrc/``) behind the primitive contract.

For users who cannot JIT Triton, and where the hardware's own instructions can go further. The
kernels (see ``csrc/*_kernels.cu``) are registered with the dispatcher as ``torch.ops.lsr_kernels.*``:

=====================  ========================================================================
``info_nce_fwd/bwd``   ``CE(s a b^T)`` or its symmetric mean: tiled ``S = a b^T``, online
                       log-sum-exp over rows and (same pass) columns, backward recomputing tiles
                       from the saved per-row / per-column statistics, ``grad_s`` reduced in-kernel.
``info_nce_fwd_grad``  one-way ``CE(s a b^T)`` when ``a`` needs a gradient: the same pass forms
                       ``P b - b_pos`` (FlashAttention's forward with ``V = b``, online softmax
                       against a lazily moved row max), so the backward launches only for ``b``.
``exp_gram_fwd/bwd``   ``sum_jk exp(-t ||x_j - x_k||^2)`` over upper-triangle tiles.
``itc_fwd/bwd``        ALBEF's soft-target cross-entropy over ``N x (N + K)`` logits.
=====================  ========================================================================

No ``N x N`` (or ``N x (N + K)``) buffer exists in any forward or backward. fp16 / bf16 use tensor
cores (``ldmatrix`` + ``mma.sync`` m16n8k16, fp32 accumulation, sm_80+); fp32 and fp64 use FMA
kernels (fp64 for gradcheck).

The compiled library is loaded inside a guard (xformers' ``_cpp_lib.py`` pattern): importing this
module never fails for lack of it. :data:`HAS_CUDA_EXT` says whether the ops are available; calling
a primitive without them raises a :class:`RuntimeError` that says how to build them, either

- ahead of time: ``LSR_BUILD_CUDA=1 pip install --no-build-isolation -e .`` (see ``setup.py``), or
- just in time: :func:`load_jit` (ninja + nvcc through ``torch.utils.cpp_extension.load``).

:func:`load_cpu_emulation` builds the same C++ sources against a CPU emulation of the CUDA features
they use (``csrc/cpu_emulation/``) so the kernels can be tested on machines without a GPU.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from .. import _validation as V

#: The CUDA sources the JIT and emulation builds compile: the copy an installed wheel carries
#: (``lsr_kernels/_csrc``, see setup.py), else ``csrc/`` of the source checkout (editable install).
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
CSRC_DIR = _PACKAGE_DIR / "_csrc" if (_PACKAGE_DIR / "_csrc").is_dir() else _PACKAGE_DIR.parent / "csrc"

_NAMESPACE = "lsr_kernels"
_EMULATION_NAMESPACE = "lsr_kernels_emu"
_OP_NAMES = ("info_nce_fwd", "info_nce_bwd", "info_nce_fwd_grad", "exp_gram_fwd", "exp_gram_bwd", "itc_fwd",
             "itc_bwd")
_OP_SOURCES = ("info_nce.cpp", "info_nce_kernels.cu", "exp_gram.cpp", "exp_gram_kernels.cu", "itc.cpp",
               "itc_kernels.cu")
_EMULATION_SOURCES = ("info_nce.cpp", "exp_gram.cpp", "itc.cpp", "cpu_emulation/emu_info_nce_kernels.cpp",
                      "cpu_emulation/emu_exp_gram_kernels.cpp", "cpu_emulation/emu_itc_kernels.cpp",
                      "cpu_emulation/emu_fragment_probe.cpp")
#: Architectures the JIT build targets when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible
#: (as setup.py: A100, H100 / H200, and PTX for newer GPUs).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# No -std: torch's build helpers pick the standard its headers need (C++17 or C++20).
NVCC_FLAGS = ["-O3", "-DNDEBUG", "-lineinfo"]
CXX_FLAGS = ["-O3", "-DNDEBUG"]

_BUILD_HINT = (
    "the lsr_kernels CUDA extension is not available. Build it just in time (an installed wheel carries "
    "the sources; a few minutes, cached per torch version) with\n"
    "    from lsr_kernels.backends import cuda; cuda.load_jit()\n"
    "or ahead of time, from a source checkout, with\n"
    "    LSR_BUILD_CUDA=1 pip install --no-build-isolation -e .\n"
    "Both need nvcc of torch's CUDA major version, a CUDA build of torch and ninja (pip install ninja)."
)


def _ops_registered(namespace: str = _NAMESPACE) -> bool:
    try:
        ns = getattr(torch.ops, namespace)
        for name in _OP_NAMES:
            getattr(ns, name).default
    except (AttributeError, RuntimeError):
        return False
    return True


_LOAD_ERROR: Optional[str] = None
_FAKES_REGISTERED: set = set()


def _load_prebuilt() -> bool:
    """Load ``lsr_kernels._C`` (built by setup.py) if it is there; never raise."""
    global _LOAD_ERROR
    if _ops_registered():
        return True
    try:
        importlib.import_module("lsr_kernels._C")
    except Exception as exc:  # missing, or built against another torch: "not available", not a crash
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        return False
    return _ops_registered()


#: Whether the compiled ops are loaded (re-exported as ``lsr_kernels.HAS_CUDA_EXT``).
HAS_CUDA_EXT: bool = False


def _on_loaded(namespace: str) -> None:
    global HAS_CUDA_EXT
    _register_fakes(namespace)
    if namespace == _NAMESPACE:
        HAS_CUDA_EXT = True


# ------------------------------------------------------------------------ fake (meta) kernels
def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register_fakes(namespace: str) -> None:
    """Shape-only implementations, so that torch.compile / FakeTensor can trace the ops."""
    if namespace in _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED.add(namespace)
    lib = f"{namespace}::"

    @torch.library.register_fake(lib + "info_nce_fwd")
    def _info_nce_fwd(a, b, scale, symmetric, offset):
        n = a.shape[0]
        return (a.new_empty((), dtype=_acc(a)), a.new_empty((n,), dtype=_acc(a)),
                a.new_empty((n if symmetric else 0,), dtype=_acc(a)))

    @torch.library.register_fake(lib + "info_nce_bwd")
    def _info_nce_bwd(grad_loss, a, b, scale, lse_row, lse_col, symmetric, compute_grad_b, offset,
                      compute_grad_a=True):
        grad_a = torch.empty_like(a) if compute_grad_a else a.new_empty((0,))
        grad_b = torch.empty_like(b) if compute_grad_b else a.new_empty((0,))
        return grad_a, grad_b, a.new_empty((), dtype=_acc(a))

    @torch.library.register_fake(lib + "info_nce_fwd_grad")
    def _info_nce_fwd_grad(a, b, scale, offset):
        return (a.new_empty((), dtype=_acc(a)), a.new_empty((a.shape[0],), dtype=_acc(a)),
                a.new_empty(a.shape, dtype=_acc(a)),
                a.new_empty((), dtype=_acc(a)))

    @torch.library.register_fake(lib + "exp_gram_fwd")
    def _exp_gram_fwd(x, t):
        return x.new_empty((), dtype=_acc(x))

    @torch.library.register_fake(lib + "exp_gram_bwd")
    def _exp_gram_bwd(grad_total, x, t):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "itc_fwd")
    def _itc_fwd(q, q_m, bank, scale, alpha):
        n = q.shape[0]
        return (q.new_empty((), dtype=_acc(q)), q.new_empty((n,), dtype=_acc(q)),
                q.new_empty((n,), dtype=_acc(q)))

    @torch.library.register_fake(lib + "itc_bwd")
    def _itc_bwd(grad_loss, q, q_m, bank, scale, lse, lse_m, alpha):
        return torch.empty_like(q), q.new_empty((), dtype=_acc(q))


# ---------------------------------------------------------------------- autograd over the ops
def _scale_grad(grad: Tensor, scale: Tensor) -> Tensor:
    return grad.to(scale.dtype).reshape(scale.shape)


def _make_primitives(ops: Callable[[], Any]) -> SimpleNamespace:
    """The three primitives as autograd Functions over one op namespace (real or emulated), which
    ``ops()`` looks up at each call: Dynamo before torch 2.11 cannot trace a call on an op-namespace
    object held in a closure (it has no source for it)."""

    class InfoNCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, scale, symmetric, offset):
            loss, lse_row, lse_col = ops().info_nce_fwd(a, b, scale, symmetric, offset)
            ctx.save_for_backward(a, b, scale, lse_row, lse_col)
            ctx.symmetric, ctx.offset = symmetric, offset
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            V.refuse_double_backward("cuda", "info_nce")
            a, b, scale, lse_row, lse_col = ctx.saved_tensors
            need_a, need_b, need_s = ctx.needs_input_grad[:3]
            if not (need_a or need_b or need_s):
                return None, None, None, None, None
            # grad_a's launch also reduces grad_s; with neither wanted it is skipped
            grad_a, grad_b, grad_s = ops().info_nce_bwd(grad_loss, a, b, scale, lse_row, lse_col,
                                                        ctx.symmetric, need_b, ctx.offset, need_a or need_s)
            return (grad_a if need_a else None, grad_b if need_b else None,
                    _scale_grad(grad_s, scale) if need_s else None, None, None)

    class InfoNCEWithGrad(torch.autograd.Function):
        """One-way, ``a`` needs a gradient: it is formed in the forward pass (``info_nce_fwd_grad``),
        so the backward only scales it and launches once more for ``b``'s (4 N M D products, not 5)."""

        @staticmethod
        def forward(ctx, a, b, scale, offset):
            loss, lse_row, grad_unit, ds = ops().info_nce_fwd_grad(a, b, scale, offset)
            ctx.save_for_backward(a, b, scale, lse_row, grad_unit, ds)
            ctx.offset = offset
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            V.refuse_double_backward("cuda", "info_nce")
            a, b, scale, lse_row, grad_unit, ds = ctx.saved_tensors
            need_a, need_b, need_s = ctx.needs_input_grad[:3]
            n, acc = a.shape[0], _acc(a)
            g = grad_loss.to(acc).reshape(())
            grad_a = (grad_unit * (g * scale.to(acc).reshape(()) / n)).to(a.dtype) if need_a else None
            grad_s = _scale_grad(g / n * ds, scale) if need_s else None
            grad_b = None
            if need_b:
                _, grad_b, _ = ops().info_nce_bwd(grad_loss, a, b, scale, lse_row, lse_row, False, True,
                                                  ctx.offset, False)
            return grad_a, grad_b, grad_s, None

    class ExpGramSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, t):
            ctx.save_for_backward(x)
            ctx.t = t
            return ops().exp_gram_fwd(x, t)

        @staticmethod
        def backward(ctx, grad_total):
            V.refuse_double_backward("cuda", "exp_gram_sum")
            (x,) = ctx.saved_tensors
            if not ctx.needs_input_grad[0]:
                return None, None
            return ops().exp_gram_bwd(grad_total, x, ctx.t), None

    class ItcSoftCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, q_m, bank, scale, alpha):
            loss, lse, lse_m = ops().itc_fwd(q, q_m, bank, scale, alpha)
            ctx.save_for_backward(q, q_m, bank, scale, lse, lse_m)
            ctx.alpha = alpha
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            V.refuse_double_backward("cuda", "itc_soft_ce")
            q, q_m, bank, scale, lse, lse_m = ctx.saved_tensors
            need_q, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
            if not (need_q or need_s):
                return None, None, None, None, None
            grad_q, grad_s = ops().itc_bwd(grad_loss, q, q_m, bank, scale, lse, lse_m, ctx.alpha)
            # The soft targets and the bank are constants (ALBEF computes them under no_grad).
            return (grad_q if need_q else None, None, None, _scale_grad(grad_s, scale) if need_s else None, None)

    def info_nce(a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, offset: int = 0) -> Tensor:
        if not symmetric and a.requires_grad and torch.is_grad_enabled():
            return InfoNCEWithGrad.apply(a.contiguous(), b.contiguous(), scale, int(offset))
        return InfoNCE.apply(a.contiguous(), b.contiguous(), scale, bool(symmetric), int(offset))

    def exp_gram_sum(x: Tensor, t: float) -> Tensor:
        return ExpGramSum.apply(x.contiguous(), float(t))

    def itc_soft_ce(q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, alpha: float) -> Tensor:
        return ItcSoftCE.apply(q.contiguous(), q_m.contiguous(), bank.contiguous(), scale, float(alpha))

    return SimpleNamespace(info_nce=info_nce, exp_gram_sum=exp_gram_sum, itc_soft_ce=itc_soft_ce, ops=ops())


_PRIMITIVES: Dict[str, SimpleNamespace] = {}


def _primitives(namespace: str = _NAMESPACE) -> SimpleNamespace:
    if namespace not in _PRIMITIVES:
        _PRIMITIVES[namespace] = _make_primitives(lambda: getattr(torch.ops, namespace))
    return _PRIMITIVES[namespace]


# ------------------------------------------------------------------------- public primitives
def _require_extension() -> None:
    if not HAS_CUDA_EXT:
        detail = f"\n(loading lsr_kernels._C failed with {_LOAD_ERROR})" if _LOAD_ERROR else ""
        raise RuntimeError(f"backend='cuda': {_BUILD_HINT}{detail}")


def _require_cuda(**tensors: Tensor) -> None:
    for name, x in tensors.items():
        if not isinstance(x, Tensor) or not x.is_cuda:
            got = x.device if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"backend='cuda': {name} must be a CUDA tensor, got {got}")


def info_nce(a: Tensor, b: Tensor, scale: Tensor, symmetric: bool, offset: int = 0) -> Tensor:
    """``CE(s a b^T)``, or ``(CE(s a b^T) + CE(s b a^T)) / 2`` when ``symmetric``; one-way with a
    rectangular ``b`` and the positives at ``offset`` (see backends/__init__)."""
    _require_extension()
    _require_cuda(a=a, b=b, scale=scale)
    offset = V.check_info_nce_operands(a, b, symmetric, offset)
    return _primitives().info_nce(a, b, scale, symmetric, offset)


def exp_gram_sum(x: Tensor, t: float) -> Tensor:
    """``sum_{j,k} exp(-t ||x_j - x_k||^2)``, the pair ``j = k`` included."""
    _require_extension()
    _require_cuda(x=x)
    return _primitives().exp_gram_sum(x, t)


def itc_soft_ce(q: Tensor, q_m: Tensor, bank: Tensor, scale: Tensor, alpha: float) -> Tensor:
    """``-(1/N) sum_ij Y_ij log softmax(s q bank^T)_ij``, ``Y = alpha softmax(s q_m bank^T) + (1 - alpha) I``."""
    _require_extension()
    _require_cuda(q=q, q_m=q_m, bank=bank, scale=scale)
    return _primitives().itc_soft_ce(q, q_m, bank, scale, alpha)


# ------------------------------------------------------------------------------------ builds
def cuda_include_dirs() -> List[str]:
    """The CUDA toolkit's include directory, then the pip wheels' ``nvidia/cu*/include`` ones.

    The wheels' headers complete a partial toolkit (cuBLAS / cuSPARSE headers that torch's own
    headers include); the toolkit's come first so that they win where both exist.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    dirs = []
    # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit.
    for home in (CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if _has_cuda_headers(home):
            dirs.append(os.path.join(home, "include"))
            break
    for root in sys.path:
        dirs.extend(sorted(glob.glob(os.path.join(root, "nvidia", "cu[0-9]*", "include"))))
    return list(dict.fromkeys(dirs))


def _has_cuda_headers(home: Optional[str]) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


def _ensure_cuda_home() -> None:
    """Point torch's build helpers at a complete CUDA toolkit.

    torch guesses CUDA_HOME once, from the nvcc on PATH; when that nvcc is a wrapper script outside
    the toolkit (its parent has no include/ or lib64/), compiling and linking fail. Without an
    explicit CUDA_HOME / CUDA_PATH, fall back to /usr/local/cuda when it is a complete toolkit.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    from torch.utils import cpp_extension

    if _has_cuda_headers(cpp_extension.CUDA_HOME):
        return
    for home in ("/usr/local/cuda",):
        if _has_cuda_headers(home):
            os.environ["CUDA_HOME"] = home
            cpp_extension.CUDA_HOME = home  # resolved at import; the build helpers read this global
            return


def _sources(names) -> List[str]:
    paths = [CSRC_DIR / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"the CUDA sources are not there ({', '.join(missing)}): building needs the sources "
                           f"a wheel carries (lsr_kernels/_csrc) or a source checkout (csrc/ next to the "
                           f"lsr_kernels package)")
    return [str(p) for p in paths]


def _jit_build(name: str, build_directory: Optional[str], **kwargs: Any) -> None:
    """``torch.utils.cpp_extension.load`` of one of this package's libraries, made safe to repeat.

    - The name (the library's file and, by default, its folder in torch's extension cache) carries
      torch's version: the cache keys a build on its sources and flags only, so after a torch upgrade
      it would load the old build, which fails with "undefined symbol".
    - torch before 2.14 serialises builds of a folder with a lock *file* (``FileBaton``) that a killed
      build leaves behind; every later build would then wait on it forever. These builds take an
      ``flock`` on the folder first, which the OS releases when its holder dies, so under such a torch
      a lock file found while holding it is a dead build's and is removed. (torch 2.14 holds an OS
      lock on that file instead, which a dead build releases; the file stays, harmlessly.)
    """
    from torch.utils import cpp_extension

    name = f"{name}_torch_{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}"
    if build_directory is None:
        build_directory = cpp_extension._get_build_directory(name, verbose=False)  # what load() would use
    os.makedirs(build_directory, exist_ok=True)
    with open(os.path.join(build_directory, "lsr_kernels_build.flock"), "a") as held:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): torch's lock file alone
            fcntl = None
        if fcntl is not None:
            fcntl.flock(held, fcntl.LOCK_EX)
            stale = os.path.join(build_directory, "lock")
            if hasattr(cpp_extension, "FileBaton") and os.path.exists(stale):
                warnings.warn(f"lsr_kernels: removing {stale}, left by a build that was interrupted", stacklevel=3)
                os.remove(stale)
        cpp_extension.load(name=name, build_directory=build_directory, **kwargs)


def load_jit(verbose: bool = False, build_directory: Optional[str] = None) -> None:
    """Compile ``csrc/`` with ninja + nvcc (``torch.utils.cpp_extension.load``) and load the ops.

    The architectures come from ``TORCH_CUDA_ARCH_LIST``; unset, torch targets the visible GPUs,
    or :data:`DEFAULT_ARCH_LIST` (sm_80, sm_90 + PTX) when none is visible. Compiling takes a few
    minutes; ``build_directory`` (default: torch's extension cache) keeps the result across runs.
    """
    if _ops_registered():
        _on_loaded(_NAMESPACE)
        return
    sources = _sources(_OP_SOURCES)
    _ensure_cuda_home()
    arch_unset = "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available()
    if arch_unset:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    try:
        _jit_build(
            "lsr_kernels_cuda", build_directory,
            sources=sources,
            extra_include_paths=[str(CSRC_DIR)] + cuda_include_dirs(),
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            verbose=verbose,
            is_python_module=False,
        )
    finally:
        if arch_unset:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
    if not _ops_registered():
        raise RuntimeError("lsr_kernels: the JIT-built library loaded but registered no torch.ops.lsr_kernels ops")
    _on_loaded(_NAMESPACE)


_EMULATION_BUILD: Optional[str] = None  # which build of the emulation this process loaded


#: load_cpu_emulation's sanitizers: the runtime library each needs preloaded, its compile flags.
_SANITIZERS = {
    "thread": ("libtsan", ["-O1", "-g", "-fsanitize=thread"]),
    # recoverable: one run reports every bad access instead of stopping at the first
    "address": ("libasan", ["-O1", "-g", "-fsanitize=address", "-fsanitize-recover=address",
                            "-fno-omit-frame-pointer"]),
}


def _runtime_loaded(library: str) -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return library in maps.read()
    except OSError:
        return False


def load_cpu_emulation(verbose: bool = False, build_directory: Optional[str] = None,
                       sanitize: Optional[str] = None) -> SimpleNamespace:
    """Build the kernels against the CPU emulation of ``csrc/cpu_emulation/cuda_emu.h`` (tests only).

    Returns the three primitives (``info_nce``, ``exp_gram_sum``, ``itc_soft_ce``) for CPU tensors,
    running the very kernel and op-wrapper sources of the CUDA build (threads of a block as real
    threads, one block at a time; slow: tiny shapes only), plus ``ops`` (``torch.ops.lsr_kernels_emu``).

    ``sanitize`` builds it (separately, ``-O1 -g``) with ThreadSanitizer (``"thread"``: any two
    threads of a block touching the same memory with no barrier between them, a missing
    ``__syncthreads``) or AddressSanitizer (``"address"``: any access past a global buffer or the
    block's shared memory). Python must run with that sanitizer's runtime preloaded
    (``LD_PRELOAD=$(gcc -print-file-name=libtsan.so)``, ``libasan.so``);
    ``scripts/cuda_emu_sanitize.py`` does that.
    """
    if sanitize is not None and sanitize not in _SANITIZERS:
        raise ValueError(f"sanitize: expected None, 'thread' or 'address', got {sanitize!r}")
    if sanitize is not None and not _runtime_loaded(_SANITIZERS[sanitize][0]):
        runtime = _SANITIZERS[sanitize][0]
        raise RuntimeError(f"load_cpu_emulation(sanitize={sanitize!r}): the sanitizer's runtime is not loaded; run "
                           f"Python with LD_PRELOAD=$(gcc -print-file-name={runtime}.so) "
                           f"(or use scripts/cuda_emu_sanitize.py)")
    global _EMULATION_BUILD
    if _ops_registered(_EMULATION_NAMESPACE) and _EMULATION_BUILD != (sanitize or "plain"):
        raise RuntimeError(f"load_cpu_emulation(sanitize={sanitize!r}): this process already loaded the "
                           f"{_EMULATION_BUILD} build (one per process: the ops share a namespace)")
    if not _ops_registered(_EMULATION_NAMESPACE):
        name, flags, ldflags = "lsr_kernels_cpu_emulation", ["-O2"], []
        if sanitize is not None:
            flags = _SANITIZERS[sanitize][1]
            name, ldflags = f"{name}_{sanitize}", [f for f in flags if f.startswith("-fsanitize=")]
        _jit_build(
            name, build_directory,
            sources=_sources(_EMULATION_SOURCES),
            extra_include_paths=[str(CSRC_DIR)] + cuda_include_dirs(),
            extra_cflags=flags + ["-DLSR_CPU_EMULATION", "-pthread", "-Wno-attributes"],
            extra_ldflags=ldflags + ["-pthread"],
            verbose=verbose,
            with_cuda=False,
            is_python_module=False,
        )
        _EMULATION_BUILD = sanitize or "plain"
    _register_fakes(_EMULATION_NAMESPACE)
    return _primitives(_EMULATION_NAMESPACE)


HAS_CUDA_EXT = _load_prebuilt()
if HAS_CUDA_EXT:
    _register_fakes(_NAMESPACE)

__all__ = ["HAS_CUDA_EXT", "info_nce", "exp_gram_sum", "itc_soft_ce", "load_jit", "load_cpu_emulation",
           "cuda_include_dirs", "CSRC_DIR"]
