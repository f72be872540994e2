"""What every comparison script shares: run settings, sweeps into cases, suite execution."""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from . import ops as O
from . import providers as P
from . import records as R
from .measure import Case, run_cases


@dataclass
class Settings:
    """How a suite runs: the device, the shapes (``tiny`` shrinks every shape for smoke runs), the
    provider filter, the timing effort and where records go."""
    device: str = "cpu"
    tiny: bool = False
    providers: Optional[Sequence[str]] = None
    modes: Optional[Sequence[str]] = None
    ops: Optional[Sequence[str]] = None
    reps: int = 3
    min_time_s: float = 1.0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    threads: Optional[int] = None
    out: Optional[Path] = None
    mem_cap_bytes: Optional[int] = None
    case_timeout_s: Optional[float] = None
    extra: dict = field(default_factory=dict)

    # --tiny maps every real shape to a small one with the same ordering (N, D, K keep their order).
    def n(self, n: int) -> int:
        return max(16, n // 1024) if self.tiny else n

    def d(self, d: int) -> int:
        return max(8, d // 32) if self.tiny else d

    def k(self, k: int) -> int:
        return max(16, k // 1024) if (self.tiny and k) else k

    def wants(self, provider: str, mode: str = "full", op: Optional[str] = None) -> bool:
        return ((self.providers is None or provider in self.providers)
                and (self.modes is None or mode in self.modes)
                and (self.ops is None or op is None or op in self.ops))

    def results_file(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        return R.results_path("cpu" if self.device == "cpu" else "gpu")


def sweep(settings: Settings, suite: str, op: str, providers: Iterable[str], ns: Iterable[int],
          ds: Iterable[int], dtypes: Iterable[str], modes: Iterable[str] = ("full",), k: int = 0,
          kind: str = "timing") -> List[Case]:
    """Every (provider, N, D, dtype, mode) combination as a :class:`Case` (real shapes; ``tiny``
    applied here)."""
    cases, seen = [], set()
    for provider, n, d, dtype, mode in itertools.product(providers, ns, ds, dtypes, modes):
        key = (provider, settings.n(n), settings.d(d), dtype, mode)
        if not settings.wants(provider, mode, op) or key in seen:  # --tiny can map two shapes to one
            continue
        seen.add(key)
        cases.append(Case(provider=provider, op=op, n=settings.n(n), d=settings.d(d), dtype=dtype, mode=mode,
                          device=settings.device, k=settings.k(k), suite=suite, kind=kind, reps=settings.reps,
                          min_time_s=settings.min_time_s, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms,
                          threads=settings.threads, extra=dict(settings.extra)))
    return cases


def by_provider_priority(cases: List[Case]) -> List[Case]:
    """The library's fused paths first, torch.compile last (stable within a provider), so a run cut
    short by a time limit keeps the measurements that matter most."""
    return sorted(cases, key=lambda c: P.ORDER.index(c.provider))


def execute(settings: Settings, cases: List[Case], title: str = "") -> List[dict]:
    out = settings.results_file()
    start = time.monotonic()
    print(f"== {title or 'cases'}: {len(cases)} measurements on {settings.device}, records -> {out}", flush=True)
    recs = run_cases(cases, out, mem_cap_bytes=settings.mem_cap_bytes, timeout_s=settings.case_timeout_s)
    print(f"== {title or 'cases'}: done in {time.monotonic() - start:.1f} s", flush=True)
    return recs


def add_settings_args(parser: argparse.ArgumentParser, default_device: Optional[str] = None) -> None:
    g = parser.add_argument_group("run settings")
    g.add_argument("--device", choices=("cpu", "cuda"), default=default_device,
                   help="where to run (default: the set's own device)")
    g.add_argument("--tiny", action="store_true", help="shrink every shape (N/1024, D/32, K/1024) for a smoke run")
    g.add_argument("--providers", type=lambda s: [p for p in s.split(",") if p],
                   help=f"comma-separated subset of {','.join(P.ORDER)}")
    g.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m],
                   help="comma-separated subset of forward,backward,full")
    g.add_argument("--ops", type=lambda s: [o for o in s.split(",") if o],
                   help=f"comma-separated subset of {','.join(O.OPS)}")
    g.add_argument("--reps", type=int, default=3,
                   help="least number of timed calls: CPU, and GPU calls too slow for do_bench (default 3)")
    g.add_argument("--min-time", type=float, default=1.0, help="CPU: least timed seconds per case (default 1)")
    g.add_argument("--rep-ms", type=float, default=100.0, help="GPU: do_bench's rep in ms (default 100)")
    g.add_argument("--warmup-ms", type=float, default=25.0, help="GPU: do_bench's warmup in ms (default 25)")
    g.add_argument("--threads", type=int, help="CPU: torch threads in each measurement (default: torch's)")
    g.add_argument("--mem-cap-gb", type=float,
                   help="CPU: memory one measurement may add (default: available memory minus 3 GiB)")
    g.add_argument("--case-timeout", type=float, help="CPU: seconds one measurement may take before it is killed")
    g.add_argument("--out", type=Path, help="append records here (default: benchmarks/results/<cpu|gpu>.jsonl)")


def settings_from_args(args: argparse.Namespace, default_device: str) -> Settings:
    for name in args.providers or ():
        P.get(name)  # a clear error for a misspelt provider
    for mode in args.modes or ():
        if mode not in O.MODES:
            raise SystemExit(f"--modes: {mode!r} is not one of {O.MODES}")
    for op in args.ops or ():
        if op not in O.OPS:
            raise SystemExit(f"--ops: {op!r} is not one of {O.OPS}")
    return Settings(device=args.device or default_device, tiny=args.tiny, providers=args.providers, modes=args.modes, ops=args.ops,
                    reps=args.reps, min_time_s=args.min_time, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                    threads=args.threads, out=args.out,
                    mem_cap_bytes=int(args.mem_cap_gb * 2**30) if args.mem_cap_gb else None,
                    case_timeout_s=args.case_timeout)


def parse_ints(text: str) -> List[int]:
    """'1024,4096' or '1K,4K,1M' -> [1024, 4096] / [1024, 4096, 1048576]."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20}.get(part[-1], 1)
        out.append(int(part[:-1] if mult > 1 else part) * mult)
    return out


def comparison_main(op: str, providers: Sequence[str], default_ns: Sequence[int], default_ds: Sequence[int],
                    default_k: int = 0, argv=None, description: str = "") -> int:
    """The command line of one comparison script: a custom sweep of ``op`` over ``providers``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=parse_ints, default=list(default_ns), help="batch sizes, e.g. 4K,16K,64K")
    parser.add_argument("--d", type=parse_ints, default=list(default_ds), help="feature widths, e.g. 256,512")
    parser.add_argument("--dtype", type=lambda s: s.split(","), default=["float32"],
                        help="dtypes: float32,bfloat16,float16")
    parser.add_argument("--mode", type=lambda s: s.split(","), default=["full"], help="forward,backward,full")
    if op == "itc":
        parser.add_argument("--k", type=parse_ints, default=[default_k], help="queue length K")
    add_settings_args(parser, "cpu")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, "cpu")
    for dtype in args.dtype:
        if dtype not in O.DTYPES:
            parser.error(f"--dtype: {dtype!r} is not one of {tuple(O.DTYPES)}")
    for mode in args.mode:
        if mode not in O.MODES:
            parser.error(f"--mode: {mode!r} is not one of {O.MODES}")
    cases = []
    for k in (args.k if op == "itc" else [0]):
        cases += sweep(settings, f"bench_{op}", op, P.ordered(providers), args.n, args.d, args.dtype, args.mode, k)
    execute(settings, by_provider_priority(cases), f"{op} comparison")
    return 0
