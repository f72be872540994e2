"""Measuring one case: time (median, p20, p80 after warm-up) and peak extra memory.

GPU (in this process): ``triton.testing.do_bench`` quantiles (CUDA events, L2 flushed between calls;
triton imported lazily), or an event-timed loop when one call is so slow that do_bench's fixed
extra calls would dominate; memory from ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus what was allocated before the call.

CPU: every case runs in a fresh subprocess (``python -m benchmarks._worker``), so the peak RSS of
one process measures one case. There, after warm-up, free heap pages go back to the OS
(``malloc_trim``), the peak RSS is reset to the current RSS (``/proc/self/clear_refs``), one call
runs, and the peak RSS (``VmHWM``) minus that baseline is its peak extra memory. (Without
``clear_refs``: ``ru_maxrss`` minus its value after the inputs are allocated.)
Time comes from ``torch.utils.benchmark.Timer`` (``blocked_autorange``, topped up with single calls
to reach the minimum number of repetitions). The subprocess runs under an address-space limit
(``RLIMIT_AS``), so running out of memory is a catchable ``MemoryError``/``RuntimeError`` recorded as
``oom``, never a visit from the OOM killer on a shared machine.

Gradients never accumulate in a timed region: backward work is ``torch.autograd.grad``.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import ops as O
from . import providers as P
from . import records as R

#: do_bench repeats a call ``rep_ms / estimate`` times after 5 estimation calls and a warm-up: a call
#: slower than ``rep_ms / SLOW_CALL_REPS`` would get fewer than that many timed repetitions for about
#: 7 extra calls (a 0.9 s call: ~9 s for one sample), so it is timed with an event loop of ``reps``.
SLOW_CALL_REPS = 3
#: Leave this much of the machine's available memory to everybody else (CPU subprocess limit).
CPU_MEMORY_RESERVE_BYTES = 3 << 30


@dataclass
class Case:
    """One measurement. ``reps`` is the minimum number of timed calls (CPU; GPU probes time one
    call), ``min_time_s`` the least timed wall time on CPU, ``rep_ms``/``warmup_ms`` do_bench's."""
    provider: str
    op: str
    n: int
    d: int
    dtype: str = "float32"
    mode: str = "full"
    device: str = "cpu"
    k: int = 0
    suite: str = ""
    kind: str = "timing"
    reps: int = 3
    min_time_s: float = 1.0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    threads: Optional[int] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def label(self) -> str:
        k = f" K={O.human_n(self.k)}" if self.op == "itc" else ""
        return (f"{self.provider:<9} {self.op:<7} {self.mode:<8} N={O.human_n(self.n):<6} D={self.d:<4}{k} "
                f"{self.dtype}")


# ----------------------------------------------------------------------------------- helpers
def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()
                                              or "std::bad_alloc" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _quantiles(times_ms: List[float]):
    """(median, p20, p80) of a sample, by linear interpolation (numpy's default)."""
    xs = sorted(times_ms)

    def q(p):
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def make_timed_fn(provider: P.Provider, case: Case, inputs: O.Inputs) -> Callable[[], object]:
    """The timed region of ``case.mode``: the forward, the backward of a retained graph, or both."""
    loss_fn = provider.build(case.op, inputs)
    grad_inputs = inputs.grad_inputs
    if case.mode == "forward":
        return loss_fn
    if case.mode == "backward":
        loss = loss_fn()
        return lambda: torch.autograd.grad(loss, grad_inputs, retain_graph=True, allow_unused=True)
    if case.mode == "full":
        return lambda: torch.autograd.grad(loss_fn(), grad_inputs, allow_unused=True)
    raise ValueError(f"mode: expected one of {O.MODES}, got {case.mode!r}")


# --------------------------------------------------------------------------------------- CPU
def _proc_status_kb(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _peak_rss_bytes() -> int:
    """The address space's peak RSS (``VmHWM``), which ``clear_refs`` resets. ``ru_maxrss`` is the
    same number except that it also keeps the peak seen when any thread of the process exited, so
    after a thread exit it can hide a reset; it is the fallback where ``/proc`` is missing."""
    hwm_kb = _proc_status_kb("VmHWM")
    return hwm_kb * 1024 if hwm_kb is not None else _maxrss_bytes()


def _reset_peak_rss() -> bool:
    """Give free heap pages back and make the peak RSS equal to the current RSS; False if impossible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def limit_address_space(extra_bytes: int) -> None:
    """Cap this process's address space at its current size plus ``extra_bytes``."""
    vm_kb = _proc_status_kb("VmSize")
    if vm_kb is None:
        return
    limit = vm_kb * 1024 + int(extra_bytes)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _time_cpu_ms(fn: Callable[[], object], case: Case, first_call_s: float) -> List[float]:
    """Per-call times in ms: ``torch.utils.benchmark.Timer`` (CPU work is synchronous)."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if first_call_s * case.reps >= case.min_time_s:
        # Slow calls: exactly `reps` single calls (blocked_autorange would add a calibration call).
        return [timer.timeit(1).mean * 1e3 for _ in range(case.reps)]
    times_s = list(timer.blocked_autorange(min_run_time=case.min_time_s).times)
    while len(times_s) < case.reps:
        times_s.append(timer.timeit(1).mean)
    return [t * 1e3 for t in times_s]


def measure_cpu(case: Case, mem_cap_bytes: Optional[int] = None) -> Dict[str, object]:
    """Measure ``case`` in this process (meant to be a fresh one: see :func:`run_case`)."""
    device = torch.device("cpu")
    rec = _base_record(case, device)
    provider = P.get(case.provider)
    reason = provider.unavailable_reason(case.op, "cpu", case.d)
    if reason:
        rec.update(status="unavailable", note=reason)
        return rec
    if case.threads:
        torch.set_num_threads(case.threads)
        rec["threads"] = case.threads
    if provider.name in P.MATERIALISING and mem_cap_bytes and O.reference_matrix_bytes(case.op, case.n, case.k) > mem_cap_bytes:
        rec.update(status="oom", note=f"not run: its N x N logits need at least "
                                      f"{O.reference_matrix_bytes(case.op, case.n, case.k) / 2**30:.1f} GiB, "
                                      f"over the {mem_cap_bytes / 2**30:.1f} GiB this process may add")
        return rec
    if mem_cap_bytes:
        limit_address_space(mem_cap_bytes)
    try:
        inputs = O.make_inputs(case.op, case.n, case.d, case.dtype, device, case.k)
        fn = make_timed_fn(provider, case, inputs)
        baseline_after_inputs = _maxrss_bytes()
        fn()  # warm-up: compilation, first-touch of workspaces
        if _reset_peak_rss():
            peak_rss, baseline = _peak_rss_bytes, _peak_rss_bytes()
        else:
            peak_rss, baseline = _maxrss_bytes, baseline_after_inputs
        start = time.perf_counter()
        fn()
        first_call_s = time.perf_counter() - start
        peak_extra = max(0, peak_rss() - baseline)
        times_ms = _time_cpu_ms(fn, case, first_call_s)
    except Exception as exc:  # recorded, never fatal to the suite
        rec.update(status="oom" if _is_oom(exc) else "error", note=_short(exc))
        return rec
    median, p20, p80 = _quantiles(times_ms)
    rec.update(status="ok", ms_median=round(median, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4),
               reps=len(times_ms), peak_mem_mb=round(peak_extra / 2**20, 2))
    return R.add_rates(rec)


# --------------------------------------------------------------------------------------- GPU
#: Messages after which the CUDA context is unusable: every later case in this process would fail.
STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                      "misaligned address", "illegal instruction", "CUDA error: an illegal")


def is_sticky_cuda_error(rec: Dict[str, object]) -> bool:
    note = str(rec.get("note") or "")
    return rec.get("status") == "error" and rec.get("device_kind") == "gpu" and any(
        s in note for s in STICKY_CUDA_ERRORS)


def _time_cuda_ms(fn: Callable[[], object], case: Case, first_call_ms: float) -> List[float]:
    """Per-call times in ms from CUDA events."""
    if case.kind == "probe":
        return [first_call_ms]
    if first_call_ms * SLOW_CALL_REPS <= case.rep_ms:
        import triton.testing  # lazily: the CPU paths never import triton

        try:  # every per-call time (return_mode="all", Triton >= 3.0), so reps is known
            times = triton.testing.do_bench(fn, warmup=case.warmup_ms, rep=case.rep_ms, return_mode="all")
        except (AssertionError, TypeError, ValueError):
            median, p20, p80 = triton.testing.do_bench(fn, warmup=case.warmup_ms, rep=case.rep_ms,
                                                       quantiles=[0.5, 0.2, 0.8])
            times = [p20, median, p80]  # _quantiles gives these three back unchanged
        return [float(t) for t in times]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(SLOW_CALL_REPS, case.reps))]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def _cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def measure_cuda(case: Case) -> Dict[str, object]:
    """Measure ``case`` on the current CUDA device, in this process."""
    device = _cuda_device()
    rec = _base_record(case, device)
    provider = P.get(case.provider)
    reason = provider.unavailable_reason(case.op, "cuda", case.d)
    if reason:
        rec.update(status="unavailable", note=reason)
        return rec
    total = torch.cuda.get_device_properties(device).total_memory
    if provider.name in P.MATERIALISING and O.reference_matrix_bytes(case.op, case.n, case.k) > total:
        rec.update(status="oom", note=f"not run: its N x N logits need at least "
                                      f"{O.reference_matrix_bytes(case.op, case.n, case.k) / 2**30:.1f} GiB, "
                                      f"over the GPU's {total / 2**30:.1f} GiB")
        return rec
    inputs = fn = None
    try:
        inputs = O.make_inputs(case.op, case.n, case.d, case.dtype, device, case.k)
        fn = make_timed_fn(provider, case, inputs)
        fn()  # warm-up: torch.compile, Triton autotuning, cuBLAS heuristics
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        del out
        peak_extra = torch.cuda.max_memory_allocated(device) - baseline
        times_ms = _time_cuda_ms(fn, case, start.elapsed_time(end))
    except Exception as exc:  # recorded, never fatal to the suite
        rec.update(status="oom" if _is_oom(exc) else "error", note=_short(exc))
    else:
        median, p20, p80 = _quantiles(times_ms)
        rec.update(status="ok", ms_median=round(median, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4),
                   reps=len(times_ms),
                   peak_mem_mb=round(peak_extra / 2**20, 2))
        R.add_rates(rec)
    # Outside the except block, so the traceback's frames no longer pin the tensors.
    del inputs, fn
    gc.collect()
    release_cuda_cache()
    return rec


def release_cuda_cache() -> None:
    """``torch.cuda.empty_cache()``, which itself raises once a sticky error (an illegal address, a
    device-side assert) has broken the context: the record that says which case did it must still be
    written, and the cases after it recorded as skipped."""
    try:
        torch.cuda.empty_cache()
    except Exception:  # torch.AcceleratorError / RuntimeError: the context is gone, nothing to free
        pass


# ------------------------------------------------------------------------------------ common
def _base_record(case: Case, device: torch.device) -> Dict[str, object]:
    return R.new_record(device, suite=case.suite, kind=case.kind, status=None, provider=case.provider,
                        op=case.op, mode=case.mode, N=case.n, D=case.d, K=case.k if case.op == "itc" else None,
                        dtype=case.dtype, flops=O.matmul_flops(case.op, case.mode, case.n, case.d, case.k),
                        **case.extra)


RECORD_PREFIX = "@@lsr-bench-record@@ "


def default_cpu_mem_cap(user_cap_bytes: Optional[int] = None) -> int:
    """What a CPU subprocess may add: the user's cap, never more than available minus a reserve."""
    room = max(256 << 20, available_memory_bytes() - CPU_MEMORY_RESERVE_BYTES)
    return min(room, user_cap_bytes) if user_cap_bytes else room


def run_in_subprocess(case: Case, mem_cap_bytes: Optional[int] = None,
                      timeout_s: Optional[float] = None) -> Dict[str, object]:
    """Measure a CPU case in a fresh ``python -m benchmarks._worker`` process."""
    payload = json.dumps({"case": asdict(case), "mem_cap_bytes": mem_cap_bytes})
    env = dict(os.environ)
    env["PYTHONPATH"] = str(R.REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    failure = None
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks._worker"], input=payload, capture_output=True,
                              text=True, timeout=timeout_s, cwd=R.REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        failure = ("timeout", f"no result within {timeout_s:.0f} s (subprocess killed)")
    else:
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(RECORD_PREFIX):
                return json.loads(line[len(RECORD_PREFIX):])
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        if proc.returncode == -9:
            failure = ("oom", f"subprocess killed by SIGKILL (the OOM killer?): {tail}")
        else:
            failure = ("error", f"subprocess exited with {proc.returncode}: {tail}"[:600])
    rec = _base_record(case, torch.device("cpu"))
    rec.update(status=failure[0], note=failure[1])
    return rec


def summary_line(rec: Dict[str, object]) -> str:
    k = f" K={O.human_n(rec['K'])}" if rec.get("K") else ""
    head = (f"{rec['provider']:<9} {rec['op']:<7} {rec['mode']:<8} N={O.human_n(rec['N']):<6} D={rec['D']:<4}{k} "
            f"{rec['dtype']:<8}")
    if rec.get("status") != "ok":
        return f"{head} {rec.get('status', '?').upper()}: {rec.get('note')}"
    rate = f" {rec['tflops']:.3g} TFLOP/s" if rec.get("tflops") else ""
    floor = f" floor {100 * rec['floor_ratio']:.0f}%" if rec.get("floor_ratio") else ""
    return (f"{head} {rec['ms_median']:10.3f} ms [{rec['ms_p20']:.3f}, {rec['ms_p80']:.3f}] x{rec['reps']}"
            f"  +{rec['peak_mem_mb']:.1f} MB{rate}{floor}")


def run_case(case: Case, out_path: Optional[Path] = None, mem_cap_bytes: Optional[int] = None,
             timeout_s: Optional[float] = None, quiet: bool = False) -> Dict[str, object]:
    """Measure one case (CPU: in a fresh subprocess; GPU: here), append its record to ``out_path``."""
    reason = P.get(case.provider).unavailable_reason(case.op, case.device, case.d)
    if reason:  # known before spending a subprocess or an allocation on it
        rec = _base_record(case, torch.device(case.device) if case.device == "cpu" else _cuda_device())
        rec.update(status="unavailable", note=reason)
        if case.device == "cpu" and case.threads:
            rec["threads"] = case.threads
    elif case.device == "cpu":
        rec = run_in_subprocess(case, default_cpu_mem_cap(mem_cap_bytes), timeout_s)
    else:
        rec = measure_cuda(case)
    if out_path is not None:
        R.append(rec, out_path)
    if not quiet:
        print(summary_line(rec), flush=True)
    return rec


def run_cases(cases: List[Case], out_path: Optional[Path] = None, **kw) -> List[Dict[str, object]]:
    """Run ``cases`` in order; after an error that poisons the CUDA context, record the rest as skipped."""
    out, poisoned = [], None
    for case in cases:
        if poisoned:
            rec = skipped_record(case, poisoned, out_path)
        else:
            rec = run_case(case, out_path, **kw)
            if is_sticky_cuda_error(rec):
                poisoned = f"{rec['provider']} {rec['op']} N={rec['N']}"
        out.append(rec)
    return out


def skipped_record(case: Case, culprit: str, out_path: Optional[Path] = None) -> Dict[str, object]:
    """The record of a case not run because ``culprit`` broke this process's CUDA context."""
    rec = _base_record(case, _cuda_device() if case.device == "cuda" else torch.device("cpu"))
    rec.update(status="skipped", note=f"not run: an earlier case broke the CUDA context ({culprit})")
    if out_path is not None:
        R.append(rec, out_path)
    print(summary_line(rec), flush=True)
    return rec
