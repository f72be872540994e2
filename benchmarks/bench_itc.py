"""ALBEF's image-text contrastive loss with momentum distillation and a queue (SPEC 2.6).

The logits are N x (N + K), with K = 65536 queue rows per modality on GPU (ALBEF's queue size) and
a smaller queue on CPU. Compared: the lsr backends against the eager reference and torch.compile.
``python -m benchmarks.bench_itc --help`` runs a custom sweep.
"""
from __future__ import annotations

import sys
from typing import List

from .common import Settings, comparison_main, sweep
from .measure import Case

OP = "itc"
PROVIDERS = ("triton", "cuda", "chunked", "reference", "compiled")
GPU_QUEUE = 65536
CPU_QUEUE = 8192


def gpu_core(s: Settings) -> List[Case]:
    """N = 4096 (a large ALBEF global batch) against K = 65536, bf16, fwd+bwd."""
    return sweep(s, "gpu-core", OP, PROVIDERS, [4096], [256], ["bfloat16"], k=GPU_QUEUE)


def gpu_sweep(s: Settings, short: bool = False) -> List[Case]:
    ns = [1024, 4096] if short else [1024, 4096, 16384]
    return sweep(s, "gpu-sweep", OP, PROVIDERS, ns, [256], ["bfloat16"], k=GPU_QUEUE)


def main(argv=None) -> int:
    return comparison_main(OP, PROVIDERS, [512, 2048], [256], default_k=CPU_QUEUE, argv=argv,
                           description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
