"""The ``triton`` backend: fused Triton kernels for the three primitives of the backend contract
(see :mod:`lsr_kernels.backends`), for NVIDIA GPUs (tuned for sm_90, H100/H200).

- :func:`info_nce` and :func:`itc_soft_ce`: :mod:`.softmax_ce` (tiled similarities, online
  log-sum-exp, both directions of a symmetric loss from one pass, recomputing backward).
- :func:`exp_gram_sum`: :mod:`.exp_gram` (upper-triangle tiles of a symmetric Gaussian Gram sum).

Each primitive is a ``torch.library`` custom op (``lsr_kernels::triton_*``) with a fake impl and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through it. CUDA tensors are
required, except under the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported),
where CPU tensors run (slowly) for testing.
"""
from .exp_gram import exp_gram_sum
from .softmax_ce import info_nce, itc_soft_ce

__all__ = ["info_nce", "exp_gram_sum", "itc_soft_ce"]
