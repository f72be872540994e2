"""The largest N each provider fits: double N from a start until it runs out of memory, hits the
bound, or the next step would break the time cap.

Every step is a fwd+bwd *probe* (one warm-up call, one measured call for time and peak memory;
``kind = "probe"``), and each search ends with one ``kind = "max_n"`` record: the largest N that ran,
its peak extra memory and time, and in ``note`` why the search stopped. For the fused paths memory is
O(N D), so on a GPU time stops them long before memory does: "time cap" means "fits at least this".
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from . import providers as P
from .common import Settings, add_settings_args, parse_ints, settings_from_args
from .measure import Case, is_sticky_cuda_error, run_case, skipped_record, summary_line
from . import records as R


def largest_n(s: Settings, suite: str, op: str, provider: str, d: int, dtype: str, n_start: int, n_max: int,
              k: int = 0, time_cap_s: float = 60.0, call_cap_s: float = 20.0) -> dict:
    """Search one provider; append the probes and the summary to ``s.results_file()``. A summary
    whose search ended in an error that broke the CUDA context has ``cuda_context_broken`` set."""
    out = s.results_file()
    n, best, stop = s.n(n_start), None, None
    n_max = s.n(n_max)
    d, k = s.d(d), s.k(k)
    start = time.monotonic()
    while True:
        case = Case(provider=provider, op=op, n=n, d=d, dtype=dtype, mode="full", device=s.device, k=k,
                    suite=suite, kind="probe", reps=1, min_time_s=0.0, threads=s.threads)
        probe_start = time.monotonic()
        rec = run_case(case, out, mem_cap_bytes=s.mem_cap_bytes, timeout_s=s.case_timeout_s)
        probe_s = time.monotonic() - probe_start
        if rec["status"] != "ok":
            stop = f"{rec['status']} at N={n}" + (f": {rec['note']}" if rec.get("note") else "")
            break
        best = rec
        call_s = rec["ms_median"] / 1e3
        elapsed = time.monotonic() - start
        if n * 2 > n_max:
            stop = f"bound N_max={n_max} reached"
            break
        if call_s > call_cap_s:
            stop = f"time cap: one fwd+bwd took {call_s:.1f} s at N={n} (cap {call_cap_s:.0f} s)"
            break
        # The next probe does about 4x this one's work (O(N^2)), its warm-up included: estimated from this
        # probe's wall time, not its one call (generous past N = 65536, where Triton's autotune key stops
        # growing and a probe no longer re-times every config).
        if elapsed + 4 * probe_s > time_cap_s:
            stop = f"time cap: N={2 * n} would take ~{4 * probe_s:.0f} s, past the {time_cap_s:.0f} s search cap"
            break
        # Before the next probe, so that a search killed by a stage's time limit still has a summary
        # (a later summary of the same search replaces it: records.KEY leaves N out for max_n).
        R.append(_summary(best, rec, f"search cut short while probing N={2 * n} (killed by a time limit?)"), out)
        n *= 2
    summary = _summary(best, rec, stop)
    if is_sticky_cuda_error(rec):
        summary["cuda_context_broken"] = True
    R.append(summary, out)
    print("largest N: " + (summary_line(summary) if best else f"{provider} {op}: none ({stop})"), flush=True)
    return summary


def _summary(best: Optional[dict], last: dict, stop: str) -> dict:
    """The ``max_n`` record of a search: its largest N that ran (``best``), or none, and why it stopped."""
    summary = {key: (best or last).get(key) for key in R.FIELDS}
    summary.update(kind="max_n", status="ok" if best else last["status"], note=stop, date=R.now())
    if best is None:
        summary.update(N=None, ms_median=None, ms_p20=None, ms_p80=None, peak_mem_mb=None, tflops=None,
                       floor_ratio=None)
    return summary


def cpu_core(s: Settings) -> List[dict]:
    """(3) of the CPU set: CLIP + geometric, D = 128, fp32: chunked up to N = 32768 (its peak extra
    memory there is the number to watch, target < 1.5 GB) and the reference until it no longer fits."""
    out = []
    for provider in ("chunked", "reference"):
        if s.wants(provider, "full", "clip_gc"):
            out.append(largest_n(s, "cpu-core", "clip_gc", provider, 128, "float32", 8192, 32768,
                                 time_cap_s=400.0, call_cap_s=120.0))
    return out


def gpu_max_n(s: Settings, time_cap_s: float = 45.0, call_cap_s: float = 15.0, n_max: int = 1 << 22) -> List[dict]:
    """CLIP and the full objective at D = 512 bf16: fused paths from N = 65536, the materialising
    ones from N = 16384, doubling up to ``n_max`` (4M) under the time caps."""
    out, poisoned = [], None
    for op, providers in (("clip", ("triton", "cuda", "chunked", "inf_cl", "open_clip", "reference", "compiled")),
                          ("full", ("triton", "cuda", "chunked", "reference", "compiled"))):
        for provider in providers:
            if not s.wants(provider, "full", op):
                continue
            start = 65536 if provider in P.FUSED else 16384
            if poisoned:  # this process's CUDA context is gone: every later search would fail at once
                case = Case(provider=provider, op=op, n=s.n(start), d=s.d(512), dtype="bfloat16", mode="full",
                            device=s.device, suite="gpu-maxn", kind="max_n")
                out.append(skipped_record(case, poisoned, s.results_file()))
                continue
            summary = largest_n(s, "gpu-maxn", op, provider, 512, "bfloat16", start, n_max,
                                time_cap_s=time_cap_s, call_cap_s=call_cap_s)
            if summary.get("cuda_context_broken"):
                poisoned = f"{provider} {op} largest-N search"
            out.append(summary)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--op", default="clip", choices=("clip", "clip_gc", "full", "itc"))
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=0, help="queue length (itc)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n-start", type=parse_ints, default=[4096])
    parser.add_argument("--n-max", type=parse_ints, default=[1 << 22])
    parser.add_argument("--time-cap", type=float, default=60.0, help="seconds per provider's search")
    parser.add_argument("--call-cap", type=float, default=20.0, help="stop once one fwd+bwd takes longer")
    add_settings_args(parser, "cpu")
    args = parser.parse_args(argv)
    s = settings_from_args(args, "cpu")
    for provider in P.ordered(s.providers or P.ORDER):
        if P.get(provider).unavailable_reason(args.op, s.device, args.d) is None or s.providers:
            largest_n(s, "bench_max_n", args.op, provider, args.d, args.dtype, args.n_start[0], args.n_max[0],
                      args.k, args.time_cap, args.call_cap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
