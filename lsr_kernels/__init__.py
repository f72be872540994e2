"""lsr-kernels: fused contrastive losses with latent-modality-structure regularisers.

Public API only; the mathematics is in SPEC.md, the oracle in :mod:`lsr_kernels.reference`.
"""
from .backends import BACKENDS
from .functional import clip_loss, itc_loss, lsr_loss
from .modules import ClipLoss, FeatureQueue, ITCLoss, LSRLoss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "HAS_CUDA_EXT",
    "ClipLoss",
    "FeatureQueue",
    "ITCLoss",
    "LSRLoss",
    "clip_loss",
    "itc_loss",
    "lsr_loss",
]


def __getattr__(name):
    # Loading the compiled extension is deferred to first use, so `import lsr_kernels` stays cheap
    # and never fails for lack of it.
    if name == "HAS_CUDA_EXT":
        from .backends import cuda

        return cuda.HAS_CUDA_EXT
    raise AttributeError(f"module 'lsr_kernels' has no attribute {name!r}")
