"""The named benchmark sets: ``cpu-core``, ``gpu-core``, ``gpu-sweep``, ``gpu-maxn``.

Each is a concatenation of the comparison scripts' cases (``bench_clip``, ``bench_full``,
``bench_itc``, ``bench_max_n``), run with the library's fused paths first.
"""
from __future__ import annotations

import time

from . import bench_clip, bench_full, bench_itc, bench_max_n
from .common import Settings, by_provider_priority, execute

SUITES = {
    "cpu-core": "the chunked-backend issue's CPU set: (1) CLIP fp32 fwd+bwd N=16K D=512: open_clip, chunked, "
                "reference, torch.compile; (2) full objective N=4K D=256: chunked, reference, torch.compile; "
                "(3) CLIP+geometric D=128: chunked's peak memory at N=32K and each provider's largest N",
    "gpu-core": "CLIP and full objective at N=32K D=512 bf16 for every GPU provider (fwd+bwd; fwd and bwd "
                "alone for the non-compiled ones), ITC at N=4K K=64K D=256",
    "gpu-sweep": "fwd+bwd against N for CLIP, full and ITC (and against D and dtype for CLIP); --short: "
                 "a few N only",
    "gpu-maxn": "largest N for every GPU provider, CLIP and full at D=512 bf16, doubling N under time caps",
}


def run_suite(name: str, s: Settings, short: bool = False, time_cap_s: float = 45.0, call_cap_s: float = 15.0,
              n_max: int = 1 << 22) -> list:
    start = time.monotonic()
    if name == "cpu-core":
        recs = execute(s, by_provider_priority(bench_clip.cpu_core(s)), "cpu-core (1) CLIP N=16K D=512")
        recs += execute(s, by_provider_priority(bench_full.cpu_core(s)), "cpu-core (2) full objective N=4K D=256")
        print("== cpu-core (3) CLIP + geometric, D=128: largest N by doubling", flush=True)
        recs += bench_max_n.cpu_core(s)
    elif name == "gpu-core":
        cases = bench_clip.gpu_core(s) + bench_full.gpu_core(s) + bench_itc.gpu_core(s)
        recs = execute(s, by_provider_priority(cases), "gpu-core")
    elif name == "gpu-sweep":
        cases = bench_clip.gpu_sweep(s, short) + bench_full.gpu_sweep(s, short) + bench_itc.gpu_sweep(s, short)
        recs = execute(s, by_provider_priority(cases), "gpu-sweep" + (" --short" if short else ""))
    elif name == "gpu-maxn":
        recs = bench_max_n.gpu_max_n(s, time_cap_s=time_cap_s, call_cap_s=call_cap_s, n_max=n_max)
    else:
        raise ValueError(f"suite: expected one of {tuple(SUITES)}, got {name!r}")
    elapsed = time.monotonic() - start
    counts = {}
    for rec in recs:
        counts[rec.get("status")] = counts.get(rec.get("status"), 0) + 1
    tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
    print(f"== {name} finished in {elapsed:.1f} s ({elapsed / 60:.1f} min): {tally}; records in {s.results_file()}",
          flush=True)
    return recs
