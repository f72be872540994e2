"""CLIP plus geometric consistency (SPEC 2.1 + 2.4, weight 0.25): the memory comparison.

The reference materialises S_VT, S_VV and S_TT (4.3 GB each in fp32 at N = 32768); the lsr
backends keep O(N D) extra memory (geometric consistency goes through D x D Gram matrices). The
CPU set measures the chunked backend's peak extra memory at N = 32768, D = 128 (target: under
1.5 GB) and each provider's largest N by doubling (see :mod:`benchmarks.bench_max_n`).
"""
from __future__ import annotations

import sys

from .common import comparison_main

OP = "clip_gc"
PROVIDERS = ("triton", "cuda", "chunked", "reference", "compiled")


def main(argv=None) -> int:
    return comparison_main(OP, PROVIDERS, [8192, 16384, 32768], [128], argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
