"""compute-sanitizer's racecheck and memcheck for the CUDA kernels, without a GPU.

The CPU emulation (csrc/cpu_emulation/cuda_emu.h) runs the kernels' own sources, each block's threads
as real threads, with __syncthreads, __syncwarp, the shuffles and the ldmatrix / mma.sync exchanges
as real barriers. Built with a sanitizer (``load_cpu_emulation(sanitize=...)``):

- ``racecheck`` (ThreadSanitizer): any two threads of a block touching the same memory with no barrier
  ordering them, i.e. a missing or misplaced ``__syncthreads``. TSan decides from happens-before, not
  from timing, so the race is reported even where the emulation's scheduling gave the right numbers.
  It reports a racing pair of source lines once per run (in the first case that hits it).
- ``memcheck`` (AddressSanitizer): any read or write past an input or output tensor or past the
  block's dynamic shared memory (allocated at exactly the requested size under ASan): what would be
  an illegal address on a GPU, or a silently masked read of another allocation.

Not covered: races between blocks (the emulation runs them one after another), the ordering of
global atomics across blocks, and anything the emulation does not model (bank conflicts, timing).

Each tool's run starts with its controls, probe kernels of the emulation build: racecheck must report
``barrier_probe`` without its ``__syncthreads`` and nothing with it; memcheck must report
``bounds_probe`` one element past a global and a shared buffer and nothing at their last element.
Then every kernel template of csrc/ runs forward and backward on shapes with several row blocks and
column tiles, ragged last ones, and a D that goes round the 3-stage cp.async ring, in each dtype asked
for, with cp.async copies landing at once and, for the tensor-core dtypes, as late as the PTX ISA
allows (LSR_EMU_CP_ASYNC=deferred). Exit status 0 when the controls behave and no kernel has a report.

    python scripts/cuda_emu_sanitize.py                                   # both tools, 4 dtypes
    python scripts/cuda_emu_sanitize.py --tool racecheck --dtypes bf16,fp32

Each tool's build (~2 min on 2 cores) goes to torch's extension cache unless ``--build-dir`` says
where (one sub-folder per tool).
"""
import argparse
import os
import subprocess
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
TENSOR_CORE = ("bf16", "fp16")
# tool: (load_cpu_emulation's sanitize, options variable, options, report marker); the runtime library
# each needs comes from lsr_kernels.backends.cuda._SANITIZERS
TOOLS = {
    # keep going past the first report (the parent counts them per case); exit status left to us
    "racecheck": ("thread", "TSAN_OPTIONS",
                  "halt_on_error=0 exitcode=0 report_signal_unsafe=0 history_size=4", "ThreadSanitizer"),
    "memcheck": ("address", "ASAN_OPTIONS", "halt_on_error=0 detect_leaks=0 exitcode=0", "AddressSanitizer"),
}
BEGIN, END = "@@sanitize begin ", "@@sanitize end "
MUST_REPORT, MUST_PASS = "control, must be reported: ", "control, must pass: "
# Forward blocks are 128 rows (fp64: 64), backward blocks 64 (fp64: 32): N = 150 gives 2-5 row
# blocks, each walking 2-5 column tiles with a ragged last one. D = 104: four 32-wide K slices of the
# backward's 3-stage ring (it wraps) and two of the forward's 64-wide 2-stage one, and rows of 208
# bytes (bf16), so no row end is 16-byte aligned for the vector loads.
N, D, QUEUE = 150, 104, 70


def runtime_library(name: str) -> str:
    """The sanitizer runtime of the C++ compiler that builds the extension, or '' when it has none."""
    cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension compiles with
    try:
        path = subprocess.run([cxx, f"-print-file-name={name}.so"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return path if os.path.isabs(path) and os.path.exists(path) else ""


# ------------------------------------------------------------------------------------- the child
def kernel_cases(emu, dtypes):
    """(name, cp.async mode, function) for every kernel template in each dtype."""
    import torch

    def unit(n, dtype, seed, grad=True):
        gen = torch.Generator().manual_seed(seed)
        x = torch.nn.functional.normalize(torch.randn(n, D, dtype=torch.float64, generator=gen), dim=-1)
        return x.to(dtype).requires_grad_(grad)

    def wide_rows(dtype):
        """a's norms alternate 3 and 0.01 against near-parallel b of norm 3: at s = 30 the rows'
        log-sum-exps lie ~270 apart, past the factored exponential's spread (two exponentials)."""
        gen = torch.Generator().manual_seed(5)
        u = torch.nn.functional.normalize(torch.randn(D, dtype=torch.float64, generator=gen), dim=0)
        near = torch.nn.functional.normalize(u + 0.1 * torch.randn(N, D, dtype=torch.float64, generator=gen), dim=-1)
        norms = torch.tensor([3.0, 0.01], dtype=torch.float64).repeat(N)[:N, None]
        return (near * norms).to(dtype).requires_grad_(), (3 * near.flip(0)).to(dtype).requires_grad_()

    def step(loss, *leaves):
        torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])

    def scale(value=10.0):
        return torch.tensor(value, dtype=torch.float32, requires_grad=True)

    out = []
    for name in dtypes:
        dtype = getattr(torch, DTYPES[name])
        a, b, q_m = unit(N, dtype, 1), unit(N, dtype, 2), unit(N, dtype, 3, grad=False)
        bank = unit(N + QUEUE, dtype, 4, grad=False)
        const_a = unit(N, dtype, 1, grad=False)
        runs = [
            # fused forward (both directions' statistics) + column finalize; backward for a and for b
            ("info_nce symmetric", lambda a=a, b=b: step(emu.info_nce(a, b, s := scale(), True), a, b, s)),
            # forward with a's gradient (FlashAttention-style), then the db launch
            ("info_nce one-way", lambda a=a, b=b: step(emu.info_nce(a, b, s := scale(), False), a, b, s)),
            # statistics-only forward (a needs no gradient), then the db launch; rectangular, offset
            ("info_nce one-way, b only, offset",
             lambda a=const_a, b=bank: step(emu.info_nce(a, b, s := scale(), False, QUEUE), b, s)),
            ("itc", lambda a=a, q_m=q_m, bank=bank: step(emu.itc_soft_ce(a, q_m, bank, s := scale(), 0.4), a, s)),
            ("exp_gram", lambda a=a: step(emu.exp_gram_sum(a, 2.0), a)),
        ]
        if name in TENSOR_CORE:
            wa, wb = wide_rows(dtype)
            runs.append(("info_nce symmetric, wide spread",
                         lambda a=wa, b=wb: step(emu.info_nce(a, b, s := scale(30.0), True), a, b, s)))
        for mode in ("immediate", "deferred") if name in TENSOR_CORE else ("immediate",):
            out += [(f"{name} {what} [cp.async {mode}]", mode, fn) for what, fn in runs]
    return out


def child(args) -> int:
    os.environ.pop("LD_PRELOAD", None)  # loaded already; ninja and the compiler run without it
    import torch

    torch.set_num_threads(1)  # torch's own (uninstrumented) worker threads would hide orderings from TSan
    from lsr_kernels.backends.cuda import load_cpu_emulation

    start = time.time()
    emu = load_cpu_emulation(build_directory=args.build_dir, sanitize=TOOLS[args.tool][0])
    print(f"{args.tool}: built / loaded the sanitized emulation in {time.time() - start:.0f} s", flush=True)

    def run(name, fn):
        sys.stderr.write(f"{BEGIN}{name}\n")
        sys.stderr.flush()
        t0 = time.time()
        fn()
        sys.stderr.write(f"{END}{name} {time.time() - t0:.1f}\n")
        sys.stderr.flush()

    os.environ.pop("LSR_EMU_CP_ASYNC", None)
    if args.tool == "racecheck":
        one = torch.ones(1)
        run(MUST_REPORT + "barrier_probe without __syncthreads", lambda: emu.ops.barrier_probe(one, False))
        run(MUST_PASS + "barrier_probe with __syncthreads", lambda: emu.ops.barrier_probe(one, True))
    else:
        values = torch.ones(40)
        run(MUST_REPORT + "bounds_probe one past the end", lambda: emu.ops.bounds_probe(values, 40))
        run(MUST_PASS + "bounds_probe at the last element", lambda: emu.ops.bounds_probe(values, 39))
    for name, mode, fn in kernel_cases(emu, args.dtypes):
        if mode == "deferred":
            os.environ["LSR_EMU_CP_ASYNC"] = "deferred"  # read at each launch
        else:
            os.environ.pop("LSR_EMU_CP_ASYNC", None)
        run(name, fn)
    return 0


# ------------------------------------------------------------------------------------ the parent
def parse(stderr: str, marker: str):
    """[(case, seconds or None, reports, the first report without its stack frames)] from a child's
    stderr, where the child marks where each case begins and ends."""
    results, case = [], None
    for line in stderr.splitlines():
        if line.startswith(BEGIN):
            case, reports, first = line[len(BEGIN):], 0, []
        elif line.startswith(END) and case is not None:
            results.append((case, float(line.rsplit(" ", 1)[1]), reports, first))
            case = None
        elif case is not None:
            if f"WARNING: {marker}" in line or f"ERROR: {marker}" in line:
                reports += 1
            if reports == 1 and len(first) < 25 and not line.lstrip().startswith("#") and line.strip():
                first.append(line)
    if case is not None:  # the child died inside a case
        results.append((case, None, reports, first))
    return results


def check(tool: str, args) -> bool:
    from lsr_kernels.backends.cuda import _SANITIZERS

    sanitize, variable, options, marker = TOOLS[tool]
    library = _SANITIZERS[sanitize][0]
    runtime = runtime_library(library)
    if not runtime:
        print(f"{tool}: the C++ compiler has no {marker} runtime ({library}.so); install it (Debian: "
              f"libgcc-12-dev) or set CXX", file=sys.stderr)
        raise SystemExit(2)
    env = dict(os.environ, LD_PRELOAD=runtime, OMP_NUM_THREADS="1")
    env[variable] = f"{options} {os.environ.get(variable, '')}".strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--tool", tool, "--dtypes", ",".join(args.dtypes)]
    if args.build_dir:
        cmd += ["--build-dir", os.path.join(args.build_dir, tool)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if args.log:
        with open(f"{args.log}.{tool}", "w") as f:
            f.write(proc.stderr)
    results = parse(proc.stderr, marker)

    ok = proc.returncode == 0 and len(results) > 2
    for case, seconds, reports, first in results:
        want_report = case.startswith(MUST_REPORT)
        good = seconds is not None and (reports > 0) == want_report
        ok &= good
        when = f"{seconds:6.1f} s" if seconds is not None else "  died  "
        print(f"{'OK  ' if good else 'FAIL'} {when}  {case}: {reports} report(s)")
        if not good and first:
            print("\n".join("       " + line for line in first))
    if not ok:
        tail = [line for line in proc.stderr.splitlines() if not line.lstrip().startswith("#")][-15:]
        print(f"{tool}: FAILED (child exit status {proc.returncode}); the end of its stderr:\n" + "\n".join(tail),
              file=sys.stderr)
    else:
        print(f"{tool}: {len(results) - 2} kernel runs, no report; the controls behaved")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", default="racecheck,memcheck", help="comma-separated, of " + ", ".join(TOOLS))
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,fp64", help="comma-separated, of " + ", ".join(DTYPES))
    parser.add_argument("--build-dir", default=None, help="where the builds go (default: torch's cache)")
    parser.add_argument("--log", default=None, help="write each tool's whole report stream to LOG.<tool>")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    tools = [t for t in args.tool.split(",") if t]
    for what, given, known in (("--dtypes", args.dtypes, DTYPES), ("--tool", tools, TOOLS)):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            parser.error(f"{what}: unknown or empty ({', '.join(unknown)}); choose from {', '.join(known)}")
    if args.child:
        args.tool = tools[0]
        if args.build_dir:
            os.makedirs(args.build_dir, exist_ok=True)
        return child(args)
    results = [check(tool, args) for tool in tools]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
