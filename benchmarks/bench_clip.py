"""CLIP's contrastive loss (SPEC 2.1 without views, open_clip's ``ClipLoss``).

Compared: the lsr backends (chunked, triton, cuda) against open_clip's ``ClipLoss``, Inf-CL, the
eager reference and ``torch.compile`` of it. ``python -m benchmarks.bench_clip --help`` runs a
custom sweep; the named sets use the functions below.
"""
from __future__ import annotations

import sys
from typing import List

from .common import Settings, comparison_main, sweep
from .measure import Case

OP = "clip"
PROVIDERS = ("triton", "cuda", "chunked", "inf_cl", "open_clip", "reference", "compiled")
CPU_PROVIDERS = ("chunked", "open_clip", "reference", "compiled")


def cpu_core(s: Settings) -> List[Case]:
    """(1) of the CPU set: fp32 fwd+bwd at N = 16384, D = 512, time and peak extra memory."""
    return sweep(s, "cpu-core", OP, CPU_PROVIDERS, [16384], [512], ["float32"])


def gpu_core(s: Settings) -> List[Case]:
    """N = 32768, D = 512, bf16: fwd+bwd for every provider; forward and backward alone for all but
    torch.compile (whose compile per mode would cost more than the rest of the set)."""
    return (sweep(s, "gpu-core", OP, PROVIDERS, [32768], [512], ["bfloat16"], ["full"])
            + sweep(s, "gpu-core", OP, PROVIDERS[:-1], [32768], [512], ["bfloat16"], ["forward", "backward"]))


def gpu_sweep(s: Settings, short: bool = False) -> List[Case]:
    """fwd+bwd against N (D = 512 bf16); unless ``short``, also against D and dtype at N = 32768."""
    ns = [4096, 16384, 65536] if short else [4096, 16384, 65536, 262144]
    cases = sweep(s, "gpu-sweep", OP, PROVIDERS, ns, [512], ["bfloat16"])
    if not short:
        cases += sweep(s, "gpu-sweep", OP, PROVIDERS[:-1], [32768], [256, 768, 1024], ["bfloat16"])
        cases += sweep(s, "gpu-sweep", OP, PROVIDERS[:-1], [32768], [512], ["float16", "float32"])
    return cases


def main(argv=None) -> int:
    return comparison_main(OP, PROVIDERS, [4096, 16384], [512], argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
