"""Result records: provenance, the JSON-lines files under ``benchmarks/results/``, de-duplication.

One record per measurement, appended as one JSON line to ``results/<device_kind>.jsonl``
(``cpu.jsonl``, ``gpu.jsonl``). Fields::

    device, device_kind, capability, torch, triton, commit, source_hash, date,      provenance
    suite, kind ("timing" | "probe" | "max_n"), status ("ok" | "oom" | "unavailable" | "error" |
    "timeout" | "skipped"), note,
    provider, op, mode, N, D, K, dtype,
    ms_median, ms_p20, ms_p80, reps, peak_mem_mb,                        measurement
    flops, tflops, peak_tflops, floor_ratio, threads

``peak_mem_mb`` is the peak *extra* memory of one call of the timed region over what was allocated
before it (inputs, and for ``backward`` the forward's saved graph): CUDA ``max_memory_allocated``,
or on CPU the rise of the process's peak RSS. ``commit`` comes from ``git rev-parse`` (or the
environment variable ``LSR_BENCH_COMMIT`` where there is no ``.git``, as on the GPU machine);
``source_hash`` is a hash of ``lsr_kernels/`` and ``csrc/`` so results stay traceable without git.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

FIELDS = ("device", "device_kind", "capability", "torch", "triton", "commit", "source_hash", "date", "suite", "kind",
          "status", "note", "provider", "op", "mode", "N", "D", "K", "dtype", "ms_median", "ms_p20",
          "ms_p80", "reps", "peak_mem_mb", "flops", "tflops", "peak_tflops", "floor_ratio", "threads")

# Dense tensor-core bf16/fp16 peak and what a well-tuned GEMM reaches (TFLOP/s), by a substring of
# torch.cuda.get_device_name(); the first match wins, so specific names come first. H100/H200 SXM:
# 989 dense; ~790 is what cuBLAS sustains (and what the issue calls achievable). The PCIe and NVL
# parts are scaled by the same 0.8.
GPU_PEAKS = (
    ("H100 PCIe", 756.0, 605.0),
    ("H100 NVL", 835.0, 668.0),
    ("H200", 989.0, 790.0),
    ("H100", 989.0, 790.0),
    ("GH200", 989.0, 790.0),
    ("A100", 312.0, 250.0),
)
LOW_PRECISION = ("bfloat16", "float16")


def gpu_peak(device_name: str):
    """``(peak, achievable)`` bf16/fp16 dense TFLOP/s for a GPU name, or ``(None, None)``."""
    for key, peak, achievable in GPU_PEAKS:
        if key in device_name:
            return peak, achievable
    return None, None


@functools.lru_cache(maxsize=None)
def commit() -> str:
    if os.environ.get("LSR_BENCH_COMMIT"):
        return os.environ["LSR_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lsr_kernels", "csrc"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha1 (12 hex digits) of the library sources (``lsr_kernels/**.py``, ``csrc/**``)."""
    h = hashlib.sha1()
    for root in ("lsr_kernels", "csrc"):
        base = REPO_ROOT / root
        if not base.exists():
            continue
        for path in sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h", ".cuh")):
            h.update(str(path.relative_to(REPO_ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> Optional[str]:
    # Read the installed version without importing triton (its import is slow, and on CPU it must
    # happen only after TRITON_INTERPRET is settled).
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:
        return None


def device_info(device: torch.device) -> Dict[str, object]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": name, "device_kind": "gpu", "capability": f"{major}.{minor}", "threads": None}
    return {"device": _cpu_name(), "device_kind": "cpu", "capability": None, "threads": torch.get_num_threads()}


def device_label(rec: Dict[str, object]) -> str:
    """The device as tables and plots name it: a CPU's thread count is part of what was measured."""
    if rec.get("device_kind") == "cpu" and rec.get("threads"):
        return f"{rec['device']} ({rec['threads']} threads)"
    return str(rec.get("device"))


def provenance(device: torch.device) -> Dict[str, object]:
    return {
        **device_info(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": commit(),
        "source_hash": source_hash(),
        "date": now(),
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_record(device: torch.device, **fields) -> Dict[str, object]:
    """A record with every field present (``None`` where it does not apply)."""
    rec = {key: None for key in FIELDS}
    rec.update(provenance(device))
    rec.update(fields)
    return rec


def add_rates(rec: Dict[str, object]) -> Dict[str, object]:
    """Fill ``tflops``, ``peak_tflops`` and ``floor_ratio`` from ``flops`` and ``ms_median``.

    ``floor_ratio = floor_ms / ms_median`` with ``floor_ms = flops / achievable`` (bf16/fp16 on a GPU
    in :data:`GPU_PEAKS`); empty on CPU and for fp32, where no tensor-core floor applies.
    """
    flops, ms = rec.get("flops"), rec.get("ms_median")
    if not flops or not ms:
        return rec
    rec["tflops"] = round(flops / (ms * 1e-3) / 1e12, 3)
    if rec.get("device_kind") == "gpu":
        peak, achievable = gpu_peak(str(rec.get("device", "")))
        rec["peak_tflops"] = peak
        if achievable and rec.get("dtype") in LOW_PRECISION:
            floor_ms = flops / (achievable * 1e12) * 1e3
            rec["floor_ratio"] = round(floor_ms / ms, 4)
    return rec


def results_path(device_kind: str, results_dir: Optional[Path] = None) -> Path:
    return Path(results_dir or RESULTS_DIR) / f"{device_kind}.jsonl"


def append(rec: Dict[str, object], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(rec, sort_keys=False) + "\n")
        fh.flush()


def load(paths: Iterable[Path]) -> List[Dict[str, object]]:
    """Every record of the given JSON-lines files (or directories of them), in file order."""
    out = []
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            if not file.exists():
                continue
            for line_no, line in enumerate(file.read_text().splitlines(), 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{file}:{line_no}: not a JSON record ({exc})") from None
    return out


KEY = ("device", "threads", "provider", "op", "mode", "N", "D", "K", "dtype", "kind")


def latest(records: Iterable[Dict[str, object]]) -> List[Dict[str, object]]:
    """The last record for each (device, threads, provider, op, mode, N, D, K, dtype, kind): later runs
    win. A ``max_n`` record answers its search whatever N it reached, so there N is left out."""
    by_key = {}
    for rec in records:
        by_key[tuple(None if (k == "N" and rec.get("kind") == "max_n") else rec.get(k) for k in KEY)] = rec
    return list(by_key.values())
