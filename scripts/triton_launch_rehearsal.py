"""Run the Triton backend's launchers through Triton's real JIT runtime for sm_90, with no GPU.

    python scripts/triton_launch_rehearsal.py                        # bf16, one config per kernel
    python scripts/triton_launch_rehearsal.py --dtypes bf16,fp32 --autotune
    python scripts/triton_launch_rehearsal.py --bench-set --autotune   # warm the cache for the GPU benchmarks

``scripts/triton_sm90_sweep.py`` compiles each kernel from a signature written by hand; the interpreter
never binds arguments the way the GPU runtime does. This goes the GPU's way: every primitive's forward
and backward (symmetric and one-way InfoNCE, the one-way forward that also returns a's gradient, ITC,
the exp-Gram sum) calls its launchers, and each ``kernel[grid](...)`` passes through
``JITFunction.run`` (argument binding, specialisation, constexprs, the compile for
``GPUTarget("cuda", 90, 32)``, and the shared-memory limit the runtime checks before a first launch).
A stand-in driver answers the runtime's device questions and every
launch stops after compiling (``warmup``): no kernel runs, and the outputs are never looked at.
With ``--autotune`` the launches go through ``triton.autotune`` as well (pruning hook, keys, one compile
per surviving config), with every config timed at 1 ms, so the first one wins.

``--bench-set`` runs the Triton shapes of the benchmark sets that ``scripts/gpu_check.sh`` runs
instead (``python -m benchmarks gpu-core`` and ``gpu-sweep --short``: CLIP, the full objective and ITC,
bf16), with the number of programs an H100 gets, so the kernels it compiles carry the GPU run's cache
keys. ``scripts/gpu_check.sh`` runs it with ``--autotune`` beside the CUDA build: the benchmarks'
autotuning then finds every config already compiled instead of compiling them on one core.

Prints one line per dtype (or benchmark op) with the number of launches and the kernels; exit status
1 when a launch raises. It patches Triton's runtime in this process only, so it must run in its own interpreter
without TRITON_INTERPRET (the script clears it before importing Triton).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from lsr_kernels.backends.triton import _common  # noqa: E402
from triton_sm90_sweep import SM90_MAX_SMEM  # noqa: E402  (this folder; the GPU runtime refuses more at launch)

#: The programs a launch aims for on an H100 SXM (two per SM, as _common.target_programs).
H100_PROGRAMS = 2 * 132
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


class Sm90Standin:
    """What ``JITFunction.run`` and ``triton.autotune`` ask the active driver, answered for one H100."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **_):
            fn()  # compiles the config
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(16)

    def clear_cache(self, cache):
        cache.zero_()


def install(compiled: list) -> None:
    driver.set_active(Sm90Standin())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel.metadata.shared > SM90_MAX_SMEM:
            raise RuntimeError(f"{self.fn.__name__}: {kernel.metadata.shared} bytes of shared memory, more than "
                               f"sm_90's {SM90_MAX_SMEM} (the launch would fail with OutOfResources)")
        compiled.append(self.fn.__name__)
        return kernel

    JITFunction.run = compile_only
    _common.check_device = lambda name, x: None  # CPU tensors stand in for CUDA ones: nothing runs
    _common.target_programs = lambda device: H100_PROGRAMS  # the GPU's grids and column splits


def rehearse(dtype: torch.dtype, n: int = 300, m: int = 700, d: int = 512) -> None:
    import lsr_kernels.backends.triton as T

    def leaf(rows):
        return torch.randn(rows, d).to(dtype).requires_grad_()

    s = torch.tensor(10.0, dtype=_common.acc_dtype(dtype), requires_grad=True)
    a, b = leaf(n), leaf(n)
    for symmetric in (True, False):
        torch.autograd.grad(T.info_nce(a, b, s, symmetric), (a, b, s))
    torch.autograd.grad(T.info_nce(a, b, s, False), (b,))  # one-way, b's gradient alone
    q_m, bank = torch.randn(n, d).to(dtype), torch.randn(m, d).to(dtype)
    torch.autograd.grad(T.itc_soft_ce(a, q_m, bank, s, 0.4), (a, s))
    torch.autograd.grad(T.exp_gram_sum(a, 2.0), (a,))


def bench_cases() -> dict:
    """The Triton shapes of the benchmark sets gpu_check.sh runs (``gpu-core``, ``gpu-sweep --short``),
    by op, the core shape first."""
    from benchmarks import bench_clip, bench_full, bench_itc
    from benchmarks.common import Settings
    settings = Settings(device="cuda", providers=["triton"], modes=["full"])
    by_op: dict = {}
    for bench in (bench_clip, bench_full, bench_itc):
        for case in bench.gpu_core(settings) + bench.gpu_sweep(settings, short=True):
            by_op.setdefault(case.op, {}).setdefault((case.n, case.d, case.k, case.dtype), case)
    return {op: list(shapes.values()) for op, shapes in by_op.items()}


def rehearse_benchmark(cases) -> None:
    """One fwd+bwd of the GPU benchmarks' Triton provider for each case (op, shape, dtype). Most N
    share their binaries (the runtime's in-process cache makes a repeat free); a small N differs where
    the launchers split the backward's columns over more programs (fp32 partial gradients)."""
    from benchmarks import ops as O, providers as P
    for case in cases:
        inputs = O.make_inputs(case.op, case.n, case.d, case.dtype, "cpu", k=case.k)
        loss = P.get("triton").build(case.op, inputs)()
        torch.autograd.grad(loss, inputs.grad_inputs, allow_unused=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: " + ",".join(DTYPES))
    parser.add_argument("--autotune", action="store_true", help="through triton.autotune, every config")
    cases = bench_cases()
    parser.add_argument("--bench-set", action="store_true",
                        help="the Triton calls of gpu_check.sh's benchmark sets (" + ", ".join(cases) + ")")
    parser.add_argument("--ops", default=",".join(cases), help="with --bench-set: which of them")
    args = parser.parse_args(argv)
    dtypes, ops = args.dtypes.split(","), args.ops.split(",")
    for flag, wanted, known in (("--dtypes", dtypes, DTYPES), ("--ops", ops, cases)):
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; expected some of {list(known)}")
    os.environ["LSR_TRITON_AUTOTUNE"] = "1" if args.autotune else "0"
    compiled: list = []
    install(compiled)
    failed = False
    jobs = ([(op, rehearse_benchmark, cases[op]) for op in ops] if args.bench_set
            else [(name, rehearse, DTYPES[name]) for name in dtypes])
    for name, job, arg in jobs:
        start, before = time.time(), len(compiled)
        try:
            job(arg)
        except Exception:  # noqa: BLE001 - report and go on to the next job
            failed = True
            print(f"FAILED {name}:\n{traceback.format_exc()}")
            continue
        kernels = sorted(set(compiled[before:]))
        print(f"OK {name}: {len(compiled) - before} launches through the JIT runtime for sm_90 (compiled, or "
              f"found in the cache) in {time.time() - start:.0f} s "
              f"(triton {triton.__version__}, torch {torch.__version__}): {' '.join(kernels)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
