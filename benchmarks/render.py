"""Plots and the README performance table, generated from the result files (no hand-typed numbers).

``python -m benchmarks render`` reads ``benchmarks/results/*.jsonl`` (later records of the same
measurement win), writes PNGs (time and peak extra memory against N, one line per provider, one
figure per device, op, mode, D and dtype) to ``benchmarks/results/plots/``, and the markdown table
to ``benchmarks/results/README_table.md``; with ``--update-readme`` it also replaces what lies between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` in README.md.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from . import ops as O
from . import providers as P
from . import records as R

PLOTS_DIR = R.RESULTS_DIR / "plots"
TABLE_PATH = R.RESULTS_DIR / "README_table.md"
README_PATH = R.REPO_ROOT / "README.md"
START_MARKER, END_MARKER = "<!-- bench:start -->", "<!-- bench:end -->"

OP_TITLES = {
    "clip": "CLIP contrastive loss",
    "clip_gc": "CLIP + geometric consistency",
    "full": "full objective (contrastive with views, separation, bridge, geometric)",
    "itc": "ALBEF ITC with momentum distillation and queue",
}
STATUS_TEXT = {"oom": "OOM", "unavailable": "n/a", "error": "error", "timeout": "timeout", "skipped": "skipped"}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


# ----------------------------------------------------------------------------------- formatting
def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return ""
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def fmt_mem(mb: Optional[float]) -> str:
    if mb is None:
        return ""
    if mb >= 1024:
        return f"{mb / 1024:.2f} GiB"
    return f"{mb:.0f} MiB" if mb >= 10 else f"{mb:.1f} MiB"


def _sort_key(rec) -> tuple:
    return (P.ORDER.index(rec["provider"]) if rec.get("provider") in P.ORDER else 99, rec.get("provider") or "")


def _shape(rec) -> str:
    k = f", K = {O.human_n(rec['K'])}" if rec.get("K") else ""
    return f"N = {O.human_n(rec['N'])}, D = {rec['D']}{k}, {DTYPE_SHORT.get(rec['dtype'], rec['dtype'])}"


def _cell(rec: Optional[dict], with_range: bool = False) -> str:
    if rec is None:
        return ""
    if rec.get("status") != "ok":
        return STATUS_TEXT.get(rec.get("status"), str(rec.get("status")))
    text = fmt_ms(rec["ms_median"])
    if with_range and rec.get("ms_p20") is not None and rec.get("reps", 0) and rec["reps"] > 1:
        text += f" ({fmt_ms(rec['ms_p20'])}–{fmt_ms(rec['ms_p80'])})"
    return text


def _provenance_line(recs: Sequence[dict]) -> str:
    first = recs[0]
    commits = sorted({str(r.get("commit")) for r in recs})
    dates = sorted(str(r.get("date"))[:10] for r in recs)
    triton = f", triton {first['triton']}" if first.get("device_kind") == "gpu" and first.get("triton") else ""
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    return f"{R.device_label(first)}; torch {first['torch']}{triton}; commit {', '.join(commits)}; {span}"


# ----------------------------------------------------------------------------------------- table
def _core_tables(recs: List[dict]) -> List[str]:
    lines: List[str] = []
    groups: Dict[tuple, List[dict]] = OrderedDict()
    for rec in recs:
        groups.setdefault((rec["op"], rec["N"], rec["D"], rec.get("K"), rec["dtype"]), []).append(rec)
    for (op, n, d, k, dtype), group in groups.items():
        modes = {r["mode"] for r in group}
        split = "forward" in modes or "backward" in modes
        by_provider: Dict[str, Dict[str, dict]] = OrderedDict()
        for rec in sorted(group, key=_sort_key):
            by_provider.setdefault(rec["provider"], {})[rec["mode"]] = rec
        ref = by_provider.get("reference", {}).get("full")
        ref_ms = ref["ms_median"] if ref and ref.get("status") == "ok" else None
        lines.append(f"**{OP_TITLES.get(op, op)}**, {_shape(group[0])}")
        lines.append("")
        head = ["provider"] + (["forward ms", "backward ms"] if split else []) + [
            "fwd+bwd ms (p20–p80)", "peak extra memory", "TFLOP/s"]
        has_floor = any(r.get("floor_ratio") for r in group)
        if has_floor:
            head.append("% of matmul floor")
        if ref_ms:
            head.append("speed-up vs reference")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for provider, per_mode in by_provider.items():
            full = per_mode.get("full")
            ok = full is not None and full.get("status") == "ok"
            row = [provider]
            if split:
                row += [_cell(per_mode.get("forward")), _cell(per_mode.get("backward"))]
            row += [_cell(full, with_range=True), fmt_mem(full["peak_mem_mb"]) if ok else "",
                    f"{full['tflops']:.3g}" if ok and full.get("tflops") is not None else ""]
            if has_floor:
                row.append(f"{100 * full['floor_ratio']:.0f}%" if ok and full.get("floor_ratio") else "")
            if ref_ms:
                row.append(f"{ref_ms / full['ms_median']:.2f}x" if ok else "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _max_n_table(recs: List[dict]) -> List[str]:
    if not recs:
        return []
    lines = ["**Largest N** (fwd+bwd, doubling N until out of memory, the bound or the time cap)", "",
             "| provider | op | D | dtype | largest N | peak extra memory | fwd+bwd ms | stopped by |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for rec in sorted(recs, key=lambda r: (r["op"], _sort_key(r))):
        ok = rec.get("status") == "ok" and rec.get("N")
        stop = str(rec.get("note") or "").split(": ", 1)[0] if ok else STATUS_TEXT.get(rec.get("status"), "")
        stop = re.sub(r"\s+", " ", str(rec.get("note") or "")) if ok else stop
        if len(stop) > 90:
            stop = stop[:87] + "..."
        lines.append(f"| {rec['provider']} | {rec['op']} | {rec['D']} | {DTYPE_SHORT.get(rec['dtype'], rec['dtype'])} | "
                     f"{O.human_n(rec['N']) if ok else '–'} | {fmt_mem(rec.get('peak_mem_mb')) if ok else ''} | "
                     f"{fmt_ms(rec.get('ms_median')) if ok else ''} | {stop.replace('|', '/')} |")
    lines.append("")
    return lines


def _unavailable_notes(recs: List[dict]) -> List[str]:
    seen = OrderedDict()
    for rec in sorted(recs, key=_sort_key):
        if rec.get("status") in ("unavailable", "error", "timeout") and rec["provider"] not in seen:
            seen[rec["provider"]] = f"{STATUS_TEXT.get(rec['status'])}: {rec.get('note')}"
    return [f"- `{p}`: {text}"[:300] for p, text in seen.items()] + ([""] if seen else [])


def render_table(records: Iterable[dict], plots: Sequence[Path] = ()) -> str:
    """The markdown performance section: per device, the core sets and the largest-N searches."""
    recs = R.latest(records)
    core = [r for r in recs if r.get("kind") == "timing" and str(r.get("suite", "")).endswith("core")]
    max_n = [r for r in recs if r.get("kind") == "max_n"]
    devices = list(OrderedDict.fromkeys(R.device_label(r) for r in sorted(core + max_n,
                                                                         key=lambda r: r["device_kind"] != "gpu")))
    out = ["<!-- generated by `python -m benchmarks render`; do not edit by hand -->", ""]
    if not devices:
        out.append("No benchmark results yet: run `python -m benchmarks cpu-core` (or `gpu-core`), then "
                   "`python -m benchmarks render`.")
        return "\n".join(out) + "\n"
    for device in devices:
        dev_core = [r for r in core if R.device_label(r) == device]
        dev_max = [r for r in max_n if R.device_label(r) == device]
        kind = (dev_core or dev_max)[0]["device_kind"].upper()
        out.append(f"### {kind}: {device}")
        out.append("")
        floor = ("; the matmul floor is the time of the N x N x D products at the chip's achievable bf16 "
                 "rate" if kind == "GPU" else "")
        out.append(f"Measured on {_provenance_line(dev_core + dev_max)}. Times are medians over repeated calls "
                   f"after warm-up (p20–p80 in brackets); memory is the peak extra memory of one call over its "
                   f"inputs{floor} (method: benchmarks/NOTES.md).")
        out.append("")
        out += _core_tables(dev_core)
        out += _max_n_table(dev_max)
        out += _unavailable_notes(dev_core + dev_max)
    dev_plots = [p for p in plots if _inside_repo(p)]  # links that work from README.md
    if dev_plots:
        out.append("Plots: " + ", ".join(f"[{p.stem}]({repo_relative(p)})" for p in dev_plots))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _inside_repo(path: Path) -> bool:
    try:
        Path(path).resolve().relative_to(R.REPO_ROOT)
    except ValueError:
        return False
    return True


def repo_relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(R.REPO_ROOT))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------- plots
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def render_plots(records: Iterable[dict], plots_dir: Path = PLOTS_DIR) -> List[Path]:
    """One PNG per (device, op, mode, D, K, dtype) with at least two N: time and peak extra memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in R.latest(records) if r.get("kind") in ("timing", "probe") and r.get("status") == "ok"]
    groups: Dict[tuple, List[dict]] = OrderedDict()
    for rec in recs:
        groups.setdefault((rec["device_kind"], R.device_label(rec), rec["op"], rec["mode"], rec["D"], rec.get("K"),
                           rec["dtype"]), []).append(rec)
    plots_dir = Path(plots_dir)
    written = []
    for (kind, device, op, mode, d, k, dtype), group in groups.items():
        if len({r["N"] for r in group}) < 2:
            continue
        plots_dir.mkdir(parents=True, exist_ok=True)
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        by_provider: Dict[str, Dict[int, dict]] = OrderedDict()
        for rec in sorted(group, key=_sort_key):
            # a timing record beats a probe of the same N (more repetitions)
            slot = by_provider.setdefault(rec["provider"], {})
            if rec["N"] not in slot or rec["kind"] == "timing":
                slot[rec["N"]] = rec
        for provider, by_n in by_provider.items():
            ns = sorted(by_n)
            med = [by_n[n]["ms_median"] for n in ns]
            lo = [max(0.0, m - (by_n[n].get("ms_p20") or m)) for n, m in zip(ns, med)]
            hi = [max(0.0, (by_n[n].get("ms_p80") or m) - m) for n, m in zip(ns, med)]
            ax_t.errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3, label=provider)
            ax_m.plot(ns, [max(by_n[n]["peak_mem_mb"], 1e-2) for n in ns], marker="o", label=provider)
        kk = f", K={O.human_n(k)}" if k else ""
        mode_text = "fwd+bwd" if mode == "full" else mode
        for ax, ylabel in ((ax_t, f"{mode_text} time (ms, median, p20-p80)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{OP_TITLES.get(op, op)}: {mode}, D={d}{kk}, {dtype}\n{device}", fontsize=10)
        fig.tight_layout()
        path = plots_dir / f"{kind}_{_slug(device)}_{op}_{mode}_D{d}{f'_K{k}' if k else ''}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------- README
def update_readme(table: str, readme: Path = README_PATH, markers=(START_MARKER, END_MARKER)) -> None:
    """Replace the text between ``markers`` (default: the bench markers) in ``readme`` with ``table``."""
    start, end = markers
    text = Path(readme).read_text()
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise ValueError(f"{readme}: add the markers {start} and {end} (in that order) where the "
                         f"generated table belongs; nothing was changed")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    Path(readme).write_text(f"{head}{start}\n{table.rstrip()}\n{end}{tail}")


def render(inputs: Sequence[Path] = (R.RESULTS_DIR,), plots_dir: Path = PLOTS_DIR, table_path: Path = TABLE_PATH,
           readme: Optional[Path] = None, plots: bool = True) -> str:
    records = R.load(inputs)
    written = []
    if plots:
        try:
            written = render_plots(records, plots_dir)
        except ImportError as exc:  # a GPU image without matplotlib still gets its table
            print(f"no plots: {exc}")
    table = render_table(records, written)
    table_path = Path(table_path)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table)
    print(f"{len(records)} records -> {table_path}" + (f", {len(written)} plots in {plots_dir}" if plots else ""))
    if readme is not None:
        update_readme(table, readme)
        print(f"README section between {START_MARKER} and {END_MARKER} updated in {readme}")
    return table
