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
from typing import List

from .. import triton_unusable_reason

_REASON = triton_unusable_reason()
if _REASON is not None:
    raise ImportError(f"backend='triton': {_REASON}. Install a newer Triton (or torch) or choose "
                      f"backend='chunked' (any device) or backend='cuda'.")

from . import exp_gram, softmax_ce  # noqa: E402  (after the check: they need a usable Triton)
from .exp_gram import exp_gram_sum
from .softmax_ce import info_nce, itc_soft_ce

__all__ = ["info_nce", "exp_gram_sum", "itc_soft_ce", "autotune_choices"]

_TUNED = (softmax_ce._softmax_ce_fwd_tuned, softmax_ce._softmax_ce_bwd_tuned, softmax_ce._info_nce_fwd_grad_tuned,
          exp_gram._exp_gram_fwd_tuned, exp_gram._exp_gram_bwd_tuned)


def autotune_choices() -> List[str]:
    """What the autotuner picked in this process, one line per (kernel, key):
    ``kernel N_BUCKET=.. M_BUCKET=.. .. dtypes -> config``. For reports (``python -m benchmarks profile``): which
    configs win on a device, e.g. whether the flattened loops beat the nested ones."""
    lines = []
    for tuned in _TUNED:
        for key, config in tuned.cache.items():
            named = " ".join(f"{name}={value}" for name, value in zip(tuned.keys, key))
            dtypes = ",".join(sorted({str(v).replace("torch.", "") for v in key[len(tuned.keys):]}))
            lines.append(f"{tuned.base_fn.__name__} {named} {dtypes} -> {config}")
    return lines
