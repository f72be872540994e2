"""ptxas's registers and spills, and the SASS instruction mix, of every CUDA kernel for sm_90, without a GPU.

    python scripts/cuda_sm90_ptxas.py                # prints the table
    python scripts/cuda_sm90_ptxas.py --write        # and writes benchmarks/results/cuda_sm90_ptxas.txt

Compiles each ``csrc/*_kernels.cu`` with ``nvcc -O3 -arch=sm_90 -Xptxas -v`` (the headers of the
toolkit, then of the pip ``nvidia/cu*`` wheels, as the extension build uses) and prints one line per
kernel instantiation: registers per thread, stack frame and spill bytes, and, where a ``cuobjdump`` is
found (the toolkit's, or the one bundled with Triton), how many tensor-core instructions (``HMMA``) and
shared-memory loads the kernel's SASS holds: ``LDSM`` (ldmatrix), ``LDS``, and generic ``LD`` (a load
the compiler could not prove to be from shared memory; slower, and a sign of an opaque fragment API).
Static counts of the unrolled code, not executed counts.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
OUT = os.path.join(ROOT, "benchmarks", "results", "cuda_sm90_ptxas.txt")
FLAGS = ["-O3", "-DNDEBUG", "-std=c++17", "-arch=sm_90", "-Xptxas", "-v"]
# Itanium-mangled template arguments of the kernels: element types and bools.
_TYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32", "d": "fp64"}
_ARG = re.compile(r"13__nv_bfloat16|6__half|Lb[01]E|[fd]")


def _nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if not found:
        sys.exit("nvcc not found (set CUDA_HOME)")
    return found


def _includes() -> list:
    dirs = [CSRC]
    for root in sys.path:
        dirs.extend(sorted(glob.glob(os.path.join(root, "nvidia", "cu[0-9]*", "include"))))
    return [f"-I{d}" for d in dict.fromkeys(dirs)]


def _pretty(mangled: str) -> str:
    """``..._19info_nce_bwd_kernelI13__nv_bfloat16Lb0ELb1EEEv...`` -> ``info_nce_bwd_kernel<bf16,0,1>``."""
    # A length-prefixed name ending in _kernel; its length may follow other digits (a hash).
    for run in re.finditer(r"\d+", mangled):
        lengths = {int(run.group()[k:]) for k in range(len(run.group()))}
        name = next((mangled[run.end():run.end() + n] for n in sorted(lengths)
                     if mangled[run.end():run.end() + n].endswith("_kernel")), None)
        if name and name.isidentifier():
            rest = mangled[run.end() + len(name):]
            if not rest.startswith("I"):
                return name
            args = [_TYPES.get(a, a[2:3] if a.startswith("Lb") else a) for a in _ARG.findall(rest[1:rest.index("EEv")])]
            return f"{name}<{','.join(args)}>"
    return mangled


def _cuobjdump():
    nvcc_dir = os.path.dirname(_nvcc())
    candidates = [os.path.join(nvcc_dir, "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton  # its wheel bundles cuobjdump
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c)), None)


MIX = ("HMMA", "LDSM", "LDS", "LD")


def instruction_mix(obj: str) -> dict:
    """``{kernel: {opcode: count}}`` for the opcodes in MIX, from the SASS in ``obj`` (empty without cuobjdump)."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    sass = subprocess.run([tool, "-sass", obj], capture_output=True, text=True).stdout
    mix = {}
    for name, body in zip(*[iter(re.split(r"\s+Function : (\S+)", sass)[1:])] * 2):
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)", body)
        mix[_pretty(name)] = {op: ops.count(op) for op in MIX}
    return mix


def usage(source: str) -> list:
    """``(kernel, registers, stack, spill stores, spill loads, instruction mix)`` per kernel in ``source``."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "k.o")
        proc = subprocess.run([_nvcc(), *FLAGS, *_includes(), "-c", source, "-o", obj], capture_output=True, text=True)
        mix = instruction_mix(obj) if proc.returncode == 0 else {}
    if proc.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{proc.stderr[-4000:]}")
    rows, current = [], None
    for line in proc.stderr.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for 'sm_90'", line)
        if entry:
            current = {"kernel": _pretty(entry.group(1)), "stack": 0, "st": 0, "ld": 0}
            continue
        if current is None:
            continue
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill:
            current.update(stack=int(spill.group(1)), st=int(spill.group(2)), ld=int(spill.group(3)))
        regs = re.search(r"Used (\d+) registers", line)
        if regs:
            rows.append((current["kernel"], int(regs.group(1)), current["stack"], current["st"], current["ld"],
                         mix.get(current["kernel"], {})))
            current = None
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"also write {os.path.relpath(OUT, ROOT)}")
    args = parser.parse_args(argv)
    version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    lines = [
        f"# ptxas resource usage of csrc/*_kernels.cu for sm_90 ({version}; {' '.join(FLAGS)}), built "
        f"{datetime.date.today().isoformat()}",
        "# by scripts/cuda_sm90_ptxas.py on a machine without a GPU, sources as committed with this file. Template",
        "# flags: <dtype, ...> as in the kernels' templates. __launch_bounds__(256, 2) caps most kernels at 128",
        "# registers; STACK/SPILL are bytes per thread (spills stay L1-resident). HMMA / LDSM / LDS / LD: static",
        "# SASS instruction counts (tensor-core mma, ldmatrix, shared and generic loads), where cuobjdump was found.",
    ]
    for source in sorted(glob.glob(os.path.join(CSRC, "*_kernels.cu"))):
        for kernel, regs, stack, st, ld, mix in sorted(usage(source)):
            counts = " ".join(f"{op}:{mix[op]:3d}" for op in MIX if op in mix)
            resources = f"REG:{regs:3d} STACK:{stack:3d} SPILL_ST:{st:3d} SPILL_LD:{ld:3d}"
            lines.append(f"{kernel:<45} {resources} {counts}".rstrip())
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.write:
        with open(OUT, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
