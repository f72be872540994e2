"""``python -m benchmarks <command>``: the named sets, the renderer, and a listing.

    python -m benchmarks list                      # sets, providers and whether each runs here
    python -m benchmarks cpu-core                  # the CPU set (about 10 min on 2 quiet cores)
    python -m benchmarks cpu-core --tiny --threads 1   # smoke run of the same plumbing, seconds
    python -m benchmarks gpu-core | gpu-sweep [--short] | gpu-maxn [--time-cap S]
    python -m benchmarks render [--update-readme]  # plots + results/README_table.md (+ README.md)
    python -m benchmarks choose-auto [--update-readme]  # auto's GPU choice from results/gpu.jsonl
    python -m benchmarks profile [--ops clip --providers triton]  # each kernel's time, in cuBLAS products

One comparison at custom shapes: ``python -m benchmarks.bench_clip --n 4K,16K --d 512 --device cuda``
(likewise ``bench_full``, ``bench_clip_gc``, ``bench_itc``, ``bench_max_n``). See NOTES.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import providers as P
from . import records as R
from .common import add_settings_args, settings_from_args
from .suites import SUITES, run_suite


def _list() -> int:
    import torch

    print("sets:")
    for name, text in SUITES.items():
        print(f"  {name:<10} {text}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("providers (ops; availability here):")
    for name in P.ORDER:
        p = P.get(name)
        where = []
        for device in devices:
            reason = p.unavailable_reason(p.ops[0], device)
            where.append(f"{device}: " + ("yes" if reason is None else f"no ({reason})"))
        print(f"  {name:<10} {p.description}; ops {','.join(p.ops)}; " + "; ".join(where))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="sets and providers")
    for name, text in SUITES.items():
        p = sub.add_parser(name, help=text, description=text)
        add_settings_args(p, "cpu" if name.startswith("cpu") else "cuda")
        if name == "gpu-sweep":
            p.add_argument("--short", action="store_true", help="a few N only (the GPU check script's variant)")
        if name == "gpu-maxn":
            p.add_argument("--time-cap", type=float, default=45.0, help="seconds per provider's search (default 45)")
            p.add_argument("--call-cap", type=float, default=15.0,
                           help="stop a search once one fwd+bwd takes longer (s, default 15)")
            p.add_argument("--n-max", type=int, default=1 << 22, help="bound on N (default 4M)")
    r = sub.add_parser("render", help="plots and the README table from the result files")
    r.add_argument("inputs", nargs="*", type=Path, default=[R.RESULTS_DIR],
                   help="result files or folders (default: benchmarks/results)")
    r.add_argument("--plots-dir", type=Path, default=None, help="default: benchmarks/results/plots")
    r.add_argument("--table", type=Path, default=None, help="default: benchmarks/results/README_table.md")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--update-readme", nargs="?", const=Path(R.REPO_ROOT / "README.md"), type=Path, default=None,
                   metavar="README", help="also splice the table between the bench markers of README.md")
    c = sub.add_parser("choose-auto", help="what backend='auto' picks on a GPU, from the GPU timings",
                       description="Rank the lsr backends at every measured GPU shape and write "
                                   "lsr_kernels/backends/auto_choice.py (see benchmarks/choose.py).")
    c.add_argument("inputs", nargs="*", type=Path, default=[R.results_path("gpu")],
                   help="result files or folders (default: benchmarks/results/gpu.jsonl)")
    c.add_argument("--out", type=Path, default=None, help="default: lsr_kernels/backends/auto_choice.py")
    c.add_argument("--print-only", action="store_true", help="print the table, write nothing")
    c.add_argument("--update-readme", nargs="?", const=Path(R.REPO_ROOT / "README.md"), type=Path, default=None,
                   metavar="README", help="also splice the table between the auto markers of README.md")
    f = sub.add_parser("profile", help="each kernel's share of a fwd+bwd step, in cuBLAS N x N x D products",
                       description="Profile forward + backward per (provider, op) and express each kernel's "
                                   "time in units of one cuBLAS product (see benchmarks/profile.py).")
    from . import profile

    profile.add_args(f)
    args = parser.parse_args(argv)

    if args.command == "list":
        return _list()
    if args.command == "render":
        from . import render

        render.render(args.inputs, plots_dir=args.plots_dir or render.PLOTS_DIR,
                      table_path=args.table or render.TABLE_PATH, readme=args.update_readme, plots=not args.no_plots)
        return 0
    if args.command == "profile":
        return profile.run_from_args(args, f)
    if args.command == "choose-auto":
        from . import choose

        choose.run(args.inputs, out=None if args.print_only else (args.out or choose.TABLE_MODULE),
                   readme=args.update_readme)
        return 0
    settings = settings_from_args(args, "cpu" if args.command.startswith("cpu") else "cuda")
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"{args.command}: no CUDA device here (use --device cpu for a dry run of its plumbing)")
    run_suite(args.command, settings, short=getattr(args, "short", False),
              time_cap_s=getattr(args, "time_cap", 45.0), call_cap_s=getattr(args, "call_cap", 15.0),
              n_max=getattr(args, "n_max", 1 << 22))
    return 0


if __name__ == "__main__":
    sys.exit(main())
