"""pytest-benchmark suite for the ``chunked`` backend on CPU (not part of the default test run).

The file name does not match ``test_*.py``, so ``python -m pytest`` never collects it; run it by name:

    python -m pytest tests/bench_chunked.py --benchmark-only -q
    python -m pytest tests/bench_chunked.py --benchmark-only --benchmark-autosave      # keep a baseline
    python -m pytest tests/bench_chunked.py --benchmark-only --benchmark-compare       # compare with it

Each case times one fwd+bwd (``torch.autograd.grad``: no gradient accumulates between rounds) of an
op through the public API, with the same inputs and ops as ``python -m benchmarks``
(:mod:`benchmarks.ops`, :mod:`benchmarks.providers`), against the reference at the same shape, and a
sweep of ``LSR_CHUNKED_BLOCK`` (rows per tile) for the contrastive primitive. GFLOP/s of the matmul
floor go into each result's ``extra_info``. Shapes are sized for a 2-core machine (seconds per case).
Peak memory is not measured here (one process runs every case): ``python -m benchmarks cpu-core``
measures it in a fresh process per case.
"""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import measure as M, ops as O, providers as P  # noqa: E402
from helpers import backend_available  # noqa: E402

pytestmark = pytest.mark.skipif(not backend_available("chunked"), reason="no chunked backend in this checkout")

# (op, N, D, K): every op at a size where the chunked backend tiles (N above one block).
SHAPES = [
    ("clip", 2048, 256, 0),
    ("clip_gc", 2048, 128, 0),
    ("full", 1024, 128, 0),
    ("itc", 512, 128, 4096),
]


def _bench(benchmark, provider, op, n, d, k, rounds=5):
    case = M.Case(provider, op, n, d, k=k, mode="full")
    inputs = O.make_inputs(op, n, d, "float32", "cpu", k)
    fn = M.make_timed_fn(P.get(provider), case, inputs)
    benchmark.group = f"{op} N={n} D={d}" + (f" K={k}" if k else "")
    benchmark.extra_info.update(op=op, N=n, D=d, K=k, provider=provider, threads=torch.get_num_threads(),
                                flops=O.matmul_flops(op, "full", n, d, k))
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gflops"] = round(O.matmul_flops(op, "full", n, d, k) / median_s / 1e9, 2)


@pytest.mark.parametrize("provider", ["chunked", "reference"])
@pytest.mark.parametrize("op,n,d,k", SHAPES, ids=[f"{s[0]}-N{s[1]}-D{s[2]}" for s in SHAPES])
def test_fwd_bwd(benchmark, provider, op, n, d, k):
    _bench(benchmark, provider, op, n, d, k)


@pytest.mark.parametrize("block", [128, 512, 2048])
def test_clip_block_size(benchmark, monkeypatch, block):
    monkeypatch.setenv("LSR_CHUNKED_BLOCK", str(block))
    _bench(benchmark, "chunked", "clip", 4096, 256, 0, rounds=3)
    benchmark.group = "clip N=4096 D=256: rows per tile (LSR_CHUNKED_BLOCK)"
    benchmark.extra_info["block"] = block
