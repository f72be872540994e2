"""The full objective (SPEC 2.5): contrastive loss with views, separation, bridge and geometric
consistency, all on with the paper's weights (1, 1, 0.25).

Compared: the lsr backends against the eager reference and ``torch.compile`` of it (no other
library computes these regularisers). ``python -m benchmarks.bench_full --help`` runs a custom sweep.
"""
from __future__ import annotations

import sys
from typing import List

from .common import Settings, comparison_main, sweep
from .measure import Case

OP = "full"
PROVIDERS = ("triton", "cuda", "chunked", "reference", "compiled")
CPU_PROVIDERS = ("chunked", "reference", "compiled")


def cpu_core(s: Settings) -> List[Case]:
    """(2) of the CPU set: fp32 fwd+bwd at N = 4096, D = 256."""
    return sweep(s, "cpu-core", OP, CPU_PROVIDERS, [4096], [256], ["float32"])


def gpu_core(s: Settings) -> List[Case]:
    """N = 32768, D = 512, bf16 fwd+bwd for every provider; forward and backward alone for the
    lsr backends."""
    return (sweep(s, "gpu-core", OP, PROVIDERS, [32768], [512], ["bfloat16"], ["full"])
            + sweep(s, "gpu-core", OP, PROVIDERS[:3], [32768], [512], ["bfloat16"], ["forward", "backward"]))


def gpu_sweep(s: Settings, short: bool = False) -> List[Case]:
    ns = [4096, 16384] if short else [4096, 16384, 65536, 131072]
    return sweep(s, "gpu-sweep", OP, PROVIDERS, ns, [512], ["bfloat16"])


def main(argv=None) -> int:
    return comparison_main(OP, PROVIDERS, [1024, 4096], [256], argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
