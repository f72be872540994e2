"""Where a fused step's time goes: each kernel's time in units of one cuBLAS N x N x D product.

    python -m benchmarks profile                          # CLIP and full, N=32K D=512 bf16, triton and cuda
    python -m benchmarks profile --ops clip --providers triton --n 16384
    python -m benchmarks profile --device cpu --tiny      # the plumbing on a CPU (operators, not kernels)

The suites time whole calls; this says which kernel to work on. It first times ``a @ b.T`` for
``[N, D]`` by ``[D, N]`` operands in the same dtype (what one of the products counted in
:data:`benchmarks.ops.PRODUCTS` costs when cuBLAS does it), then profiles forward + backward of each
(provider, op) with ``torch.profiler`` and prints, per kernel: calls per step, ms per step, its share
of the step, and ``products``: its time over the GEMM's. A fused kernel that does ``p`` products is
as fast as cuBLAS when that column reads ``p``; the step's total against :data:`PRODUCTS` is its
distance from the floor. On a CPU the same table lists operators by self CPU time (no GEMM units).
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import ops as O
from . import providers as P
from . import records as R
from .common import Settings
from .measure import Case, make_timed_fn, release_cuda_cache

#: Profiled steps after warm-up (the table is per step).
STEPS = 3
#: Kernels listed per (provider, op); the rest are summed on one line.
TOP_KERNELS = 12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    """Median ms of ``fn`` after two warm-up calls (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(2):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gemm_ms(n: int, d: int, dtype: torch.dtype, device: torch.device) -> float:
    """One ``[n, d] @ [d, n]`` product in ``dtype`` (cuBLAS on a GPU), median ms."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, d, device=device, generator=gen).to(dtype)
    b = torch.randn(n, d, device=device, generator=gen).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, b.t(), out=out), device)
    return ms


def _device_us(evt) -> float:
    """Self device time of a profiler average, across torch's renames (cuda -> device)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(evt, attr, None)
        if value:
            return float(value)
    return 0.0


def profile_step(fn: Callable[[], object], device: torch.device, steps: int = STEPS) -> List[Tuple[str, int, float]]:
    """``(name, calls, total us)`` per kernel (GPU) or operator (CPU) over ``steps`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up: compilation and autotuning stay out of the profile
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    rows = []
    for evt in prof.key_averages():
        if device.type == "cuda":
            # kernels (and memcpy/memset) are the events with device time of their own
            if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = _device_us(evt)
        else:
            us = float(evt.self_cpu_time_total)
        if us > 0:
            rows.append((evt.key, evt.count, us))
    rows.sort(key=lambda r: -r[2])
    return rows


def short_name(name: str) -> str:
    """A C++ kernel's demangled name without its return type, namespaces and parameter list
    (``void lsr::(anonymous namespace)::k<__nv_bfloat16, true>(lsr::P)`` -> ``k<__nv_bfloat16, true>``);
    other names (Triton kernels, ``Memset (Device)``, CPU operators) as they are."""
    if not name.startswith("void ") or not name.endswith(")"):
        return name
    name = name[len("void "):]
    depth = 0
    for i in range(len(name) - 1, -1, -1):  # drop the parameter list: the last balanced (...) group
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            name = name[:i]
            break
    head, angle, rest = name.partition("<")
    return re.sub(r"^(?:\w+::|\(anonymous namespace\)::)+", "", head) + angle + rest


def format_table(rows: List[Tuple[str, int, float]], steps: int, step_ms: float,
                 product_ms: Optional[float], top: int = TOP_KERNELS) -> List[str]:
    """Per-step lines: calls, ms, share of the profiled total, and products (``ms / product_ms``)."""
    total_us = sum(r[2] for r in rows) or 1.0
    unit = "products" if product_ms else ""
    lines = [f"    {'kernel' if product_ms else 'operator':<58} {'calls':>5} {'ms':>9} {'share':>6} {unit:>8}"]

    def line(name, calls, us):
        ms = us / 1e3 / steps
        prods = f"{ms / product_ms:8.2f}" if product_ms else ""
        return f"    {name[:58]:<58} {calls / steps:5.3g} {ms:9.3f} {100 * us / total_us:5.1f}% {prods}"

    if not rows:
        lines.append("    (the profiler recorded nothing)")
    for name, calls, us in rows[:top]:
        lines.append(line(short_name(name), calls, us))
    rest = rows[top:]
    if rest:
        lines.append(line(f"({len(rest)} others)", sum(r[1] for r in rest), sum(r[2] for r in rest)))
    busy_ms = total_us / 1e3 / steps
    clock = "CUDA events" if product_ms else "wall clock"
    summary = f"    step {step_ms:.3f} ms ({clock}), {'device' if product_ms else 'operator'} time {busy_ms:.3f} ms"
    if product_ms:
        summary += f" = {busy_ms / product_ms:.2f} products; step = {step_ms / product_ms:.2f} products"
    lines.append(summary)
    return lines


def run(ops: Sequence[str], providers: Sequence[str], n: int, d: int, k: int, dtype: str, device: torch.device,
        out: Optional[Path] = None) -> List[str]:
    """Profile every (provider, op); print the report and append it to ``out``."""
    info = R.provenance(device)
    lines = [f"== profile: {info.get('device')} | torch {info['torch']} | triton {info['triton']} | "
             f"commit {info['commit']} | {info['date']}",
             f"   N={n} D={d} K={k} (itc) {dtype}, forward + backward, {STEPS} profiled steps after warm-up"]
    torch_dtype = O.DTYPES[dtype]
    product_ms = None
    if device.type == "cuda":
        product_ms = gemm_ms(n, d, torch_dtype, device)
        rate = 2 * n * n * d / (product_ms * 1e-3) / 1e12
        lines.append(f"   one N x N x D product (torch.mm, cuBLAS): {product_ms:.3f} ms = {rate:.0f} TFLOP/s")
    _emit(lines, out)
    for op in ops:
        for name in providers:
            case = Case(provider=name, op=op, n=n, d=d, dtype=dtype, mode="full", device=device.type,
                        k=k if op == "itc" else 0)
            head = f"-- {name} {op}: the floor is {O.PRODUCTS[op]['full']} products"
            if op == "itc":
                head += " of N x (N + K) x D"
            reason = P.get(name).unavailable_reason(op, device.type, d)
            if reason:
                _emit([f"{head}: unavailable ({reason})"], out)
                continue
            try:
                inputs = O.make_inputs(op, n, d, dtype, device, case.k)
                fn = make_timed_fn(P.get(name), case, inputs)
                step_ms = time_ms(fn, device, reps=5)
                rows = profile_step(fn, device)
            except Exception as exc:  # reported, never fatal to the other providers
                _emit([f"{head}: ERROR {type(exc).__name__}: {str(exc)[:300]}"], out)
                continue
            finally:
                inputs = fn = None
                if device.type == "cuda":
                    release_cuda_cache()
            # an ITC product is N x (N + K) x D: scale the unit so "products" reads against the floor
            unit = product_ms * (n + case.k) / n if product_ms else None
            _emit([head] + format_table(rows, STEPS, step_ms, unit), out)
    if device.type == "cuda" and "triton" in providers:
        _emit(["-- triton autotuner choices (this run):"] + [f"   {line}" for line in triton_autotune_choices()],
              out)
    return lines


def triton_autotune_choices() -> List[str]:
    """The Triton backend's autotuner picks so far, or why there are none."""
    try:
        from lsr_kernels.backends import triton as T
    except ImportError as exc:  # no Triton here: the triton provider was unavailable anyway
        return [f"(triton unavailable: {exc})"]
    return T.autotune_choices() or ["(none: nothing was autotuned, e.g. LSR_TRITON_AUTOTUNE=0)"]


def _emit(lines: List[str], out: Optional[Path]) -> None:
    text = "\n".join(lines)
    print(text, flush=True)
    if out is not None:
        with open(out, "a") as fh:
            fh.write(text + "\n")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--ops", default="clip,full", help="comma-separated subset of " + ",".join(O.OPS))
    parser.add_argument("--providers", default="triton,cuda", help="comma-separated subset of " + ",".join(P.ORDER))
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=65536, help="ITC queue length (default 64K)")
    parser.add_argument("--dtype", choices=tuple(O.DTYPES), default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="N/1024, D/32, K/1024: a smoke run")
    parser.add_argument("--out", type=Path, help="also append the report to this file")


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    ops = [o for o in args.ops.split(",") if o]
    providers = [p for p in args.providers.split(",") if p]
    for op in ops:
        if op not in O.OPS:
            parser.error(f"--ops: {op!r} is not one of {O.OPS}")
    for name in providers:
        P.get(name)  # a clear error for a misspelt provider
    shrink = Settings(tiny=args.tiny)  # the suites' --tiny mapping
    n, d, k = shrink.n(args.n), shrink.d(args.d), shrink.k(args.k)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("profile: no CUDA device here (use --device cpu for a dry run of its plumbing)")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    run(ops, providers, n, d, k, args.dtype, device, args.out)
    return 0
