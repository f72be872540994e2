"""The benchmark suite's plumbing on CPU: tiny shapes, no timing assertions.

Covers flop counts, inputs, providers (and that every provider computes the same loss), the timed
regions of each mode, rates and floor ratios, the CPU subprocess measurement with its memory and its
out-of-memory path, the largest-N search logic, the renderer and README splicing, the command line,
and a dry run of scripts/gpu_check.sh.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root there
    sys.path.insert(0, str(REPO))

from benchmarks import bench_max_n, measure as M, ops as O, providers as P, records as R, render  # noqa: E402
from benchmarks.common import Settings, parse_ints, sweep  # noqa: E402
from benchmarks.measure import Case  # noqa: E402
from helpers import backend_available, rel_err  # noqa: E402


# ------------------------------------------------------------------------------------ ops
def test_matmul_floor_counts():
    n, d, k = 1000, 64, 5000
    unit = 2 * n * n * d
    assert O.matmul_flops("clip", "forward", n, d) == 1 * unit
    assert O.matmul_flops("clip", "full", n, d) == 4 * unit
    assert O.matmul_flops("full", "full", n, d) == 24 * unit
    assert O.matmul_flops("full", "forward", n, d) == 6 * unit
    assert O.matmul_flops("itc", "full", n, d, k) == 10 * 2 * n * (n + k) * d
    for op in O.OPS:
        counts = O.PRODUCTS[op]
        assert counts["forward"] + counts["backward"] == counts["full"], op


@pytest.mark.parametrize("op", O.OPS)
def test_inputs_are_unit_rows_with_the_right_gradients(op):
    x = O.make_inputs(op, 7, 5, "float32", "cpu", k=11)
    assert x.scale.dim() == 0 and x.scale.requires_grad
    for name, t in x.features.items():
        rows = 11 if name.endswith("queue") else 7
        assert t.shape == (rows, 5), name
        assert torch.allclose(t.norm(dim=-1), torch.ones(rows), atol=1e-6), name
        assert t.requires_grad == (name not in ("image_features_m", "text_features_m", "image_queue", "text_queue"))
    assert all(t.requires_grad for t in x.grad_inputs)
    if op == "itc":
        assert "image_queue" in x.features and "text_queue" in x.features
    half = O.make_inputs(op, 4, 3, "bfloat16", "cpu")
    assert all(t.dtype == torch.bfloat16 for t in half.features.values()) and half.scale.dtype == torch.float32


def test_human_n_and_parse_ints():
    assert [O.human_n(n) for n in (1000, 4096, 1 << 20, 3 << 20)] == ["1000", "4K", "1M", "3M"]
    assert parse_ints("1K, 4k,1M,100") == [1024, 4096, 1 << 20, 100]


# ------------------------------------------------------------------------------ providers
def test_availability_on_cpu_names_the_reason():
    assert P.get("reference").unavailable_reason("full", "cpu") is None
    assert "interpreter" in P.get("triton").unavailable_reason("clip", "cpu")
    assert "cuda only" in P.get("inf_cl").unavailable_reason("clip", "cpu")
    assert "does not compute op 'full'" in P.get("open_clip").unavailable_reason("full", "cpu")
    assert P.get("cuda").unavailable_reason("clip", "cpu") is not None
    with pytest.raises(ValueError, match="provider"):
        P.get("flash")
    assert P.ordered(["compiled", "reference", "triton"]) == ["triton", "reference", "compiled"]
    assert [P.inf_cl_head_dim(d) for d in (512, 768, 96, 24)] == [256, 256, 32, None]


def test_cuda_provider_loads_a_jit_build_when_asked(monkeypatch):
    # scripts/gpu_check.sh sets LSR_BENCH_CUDA_JIT=1 when its build stage fell back to load_jit()
    from lsr_kernels.backends import cuda as cuda_backend

    if cuda_backend.HAS_CUDA_EXT:
        pytest.skip("the CUDA extension is loaded here")
    loads = []

    def fake_load_jit():
        loads.append(1)
        monkeypatch.setattr(cuda_backend, "HAS_CUDA_EXT", True)

    def failing_load_jit():
        raise RuntimeError("nvcc not found")

    assert "not built" in P.get("cuda").unavailable_reason("clip", "cuda")
    monkeypatch.setenv("LSR_BENCH_CUDA_JIT", "1")
    monkeypatch.setattr(cuda_backend, "load_jit", failing_load_jit)
    assert "load_jit() failed: RuntimeError: nvcc not found" in P.get("cuda").unavailable_reason("clip", "cuda")
    monkeypatch.setattr(cuda_backend, "load_jit", fake_load_jit)
    assert P.get("cuda").unavailable_reason("clip", "cuda") is None and loads == [1]


def _cpu_providers(op):
    names = ["reference", "open_clip", "chunked"]
    return [n for n in names if P.get(n).unavailable_reason(op, "cpu") is None]


@pytest.mark.parametrize("op", O.OPS)
def test_every_provider_computes_the_same_loss(op):
    # A benchmark that compares different computations is meaningless: each provider's loss (and
    # the function torch.compile is given) must equal the reference API's on the same inputs.
    x = O.make_inputs(op, 13, 6, "float64", "cpu", k=9)
    expected = P.get("reference").build(op, x)()
    assert rel_err(P.reference_objective(op)(x.features, x.scale), expected) < 1e-12
    for name in _cpu_providers(op):
        got = P.get(name).build(op, x)()
        assert rel_err(got, expected) < 1e-10, name


def test_open_clip_loss_from_a_wheel_when_the_package_cannot_import(tmp_path, monkeypatch):
    """The offline GPU machine: open_clip's own loss.py, read from the wheel that travels with the tree."""
    installed = pytest.importorskip("open_clip.loss")
    import zipfile
    with zipfile.ZipFile(tmp_path / "open_clip_torch-9.9.9-py3-none-any.whl", "w") as wheel:
        wheel.write(installed.__file__, "open_clip/loss.py")
    real_import = P.importlib.import_module

    def no_open_clip(name, *args):
        if name.startswith("open_clip"):
            raise ModuleNotFoundError("No module named 'torchvision'")
        return real_import(name, *args)

    monkeypatch.setattr(P.importlib, "import_module", no_open_clip)
    monkeypatch.setattr(P, "WHEELS_DIR", str(tmp_path))
    monkeypatch.setattr(P, "_OPEN_CLIP_LOSS", None)
    assert P.get("open_clip").unavailable_reason("clip", "cpu") is None
    assert P.open_clip_loss_module().SOURCE == "open_clip_torch-9.9.9-py3-none-any.whl"
    x = O.make_inputs("clip", 13, 6, "float64", "cpu")
    assert rel_err(P.get("open_clip").build("clip", x)(), P.get("reference").build("clip", x)()) < 1e-12
    monkeypatch.setattr(P, "_OPEN_CLIP_LOSS", None)
    monkeypatch.setattr(P, "WHEELS_DIR", str(tmp_path / "empty"))
    assert "no open_clip_torch wheel" in P.get("open_clip").unavailable_reason("clip", "cpu")
    monkeypatch.setattr(P, "_OPEN_CLIP_LOSS", None)


@pytest.mark.parametrize("mode", O.MODES)
def test_timed_regions_never_accumulate_grad(mode):
    x = O.make_inputs("clip", 9, 4, "float32", "cpu")
    fn = M.make_timed_fn(P.get("reference"), Case("reference", "clip", 9, 4, mode=mode), x)
    first, second = fn(), fn()
    assert all(t.grad is None for t in x.grad_inputs)
    if mode == "forward":
        assert first.dim() == 0
    else:  # the backward of a retained graph repeats exactly; full recomputes the same
        assert len(first) == len(x.grad_inputs)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------- measurement
def test_quantiles_interpolate_like_numpy():
    assert M._quantiles([5.0]) == (5.0, 5.0, 5.0)
    med, p20, p80 = M._quantiles([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (med, p20, p80) == (3.0, pytest.approx(1.8), pytest.approx(4.2))


def test_rates_and_floor_ratio():
    flops = O.matmul_flops("clip", "full", 32768, 512)
    gpu = R.add_rates({"device_kind": "gpu", "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
                       "flops": flops, "ms_median": 10.0})
    assert gpu["tflops"] == pytest.approx(flops / 1e-2 / 1e12, rel=1e-3)
    assert gpu["peak_tflops"] == 989.0
    assert gpu["floor_ratio"] == pytest.approx(flops / 790e12 * 1e3 / 10.0, rel=1e-3)
    fp32 = R.add_rates({"device_kind": "gpu", "device": "NVIDIA H200", "dtype": "float32", "flops": flops,
                        "ms_median": 10.0})
    assert fp32.get("floor_ratio") is None and fp32["tflops"] > 0
    cpu = R.add_rates({"device_kind": "cpu", "device": "x", "dtype": "bfloat16", "flops": flops, "ms_median": 10.0})
    assert cpu.get("floor_ratio") is None and cpu["tflops"] > 0
    assert R.gpu_peak("NVIDIA H100 PCIe")[0] == 756.0


def test_provenance_fields():
    rec = R.new_record(torch.device("cpu"), provider="reference")
    assert set(R.FIELDS) <= set(rec)
    assert rec["device_kind"] == "cpu" and rec["threads"] >= 1 and rec["torch"] == torch.__version__
    assert rec["commit"] and len(rec["source_hash"]) == 12 and rec["date"].endswith("Z")


def test_unavailable_provider_is_recorded_without_running(tmp_path):
    out = tmp_path / "cpu.jsonl"
    rec = M.run_case(Case("triton", "clip", 16, 8), out, quiet=True)
    assert rec["status"] == "unavailable" and "interpreter" in rec["note"]
    assert json.loads(out.read_text())["provider"] == "triton"


def test_hopeless_shape_is_recorded_as_oom_before_allocating():
    # in this process: the check comes before any address-space limit or allocation
    rec = M.measure_cpu(Case("reference", "clip", 1 << 16, 8), mem_cap_bytes=1 << 30)
    assert rec["status"] == "oom" and "not run" in rec["note"]


def test_cpu_subprocess_measures_time_and_memory(tmp_path):
    out = tmp_path / "cpu.jsonl"
    rec = M.run_case(Case("reference", "clip", 512, 16, reps=2, min_time_s=0.01, threads=1, suite="t"), out,
                     quiet=True, timeout_s=300)
    assert rec["status"] == "ok", rec["note"]
    assert set(R.FIELDS) <= set(rec) and rec["threads"] == 1
    assert 0 < rec["ms_p20"] <= rec["ms_median"] <= rec["ms_p80"] and rec["reps"] >= 2
    # the reference holds several float32 512 x 512 matrices (1 MiB each) at its peak
    assert 1.0 < rec["peak_mem_mb"] < 200
    assert rec["flops"] == O.matmul_flops("clip", "full", 512, 16) and rec["tflops"] > 0
    assert json.loads(out.read_text().splitlines()[-1]) == rec


def test_cpu_subprocess_out_of_memory_is_recorded(tmp_path):
    # 2048 x 2048 float32 is 16 MiB; the reference needs about ten of them: a 48 MiB cap runs out
    # inside the computation, which the address-space limit turns into a catchable error.
    rec = M.run_case(Case("reference", "clip", 2048, 16, reps=1, min_time_s=0.0, threads=1), None,
                     mem_cap_bytes=48 << 20, quiet=True, timeout_s=300)
    assert rec["status"] == "oom", rec["note"]


# --------------------------------------------------------------------------- largest N
def _fake_run_case(oom_from=None, ms_at=lambda n: 1.0, broken_provider=None):
    """run_case without measuring; ``broken_provider``'s cases hit an illegal memory access (a GPU record)."""
    calls = []

    def run_case(case, out, **kw):
        calls.append(case.n)
        rec = R.new_record(torch.device("cpu"), provider=case.provider, op=case.op, mode=case.mode, N=case.n,
                           D=case.d, dtype=case.dtype, kind=case.kind, suite=case.suite)
        if case.provider == broken_provider:
            rec.update(status="error", device_kind="gpu",
                       note="AcceleratorError: CUDA error: an illegal memory access was encountered")
        elif oom_from is not None and case.n >= oom_from:
            rec.update(status="oom", note="out of memory")
        else:
            rec.update(status="ok", ms_median=ms_at(case.n), ms_p20=ms_at(case.n), ms_p80=ms_at(case.n), reps=1,
                       peak_mem_mb=case.n / 1000)
        R.append(rec, out)
        return rec

    return run_case, calls


def test_largest_n_stops_at_oom_bound_and_time_cap(tmp_path, monkeypatch):
    s = Settings(out=tmp_path / "r.jsonl")
    fake, calls = _fake_run_case(oom_from=256)
    monkeypatch.setattr(bench_max_n, "run_case", fake)
    summary = bench_max_n.largest_n(s, "t", "clip", "reference", 8, "float32", 32, 1 << 20)
    assert calls == [32, 64, 128, 256] and summary["N"] == 128 and summary["kind"] == "max_n"
    assert summary["note"].startswith("oom at N=256")

    fake, calls = _fake_run_case()
    monkeypatch.setattr(bench_max_n, "run_case", fake)
    summary = bench_max_n.largest_n(s, "t", "clip", "chunked", 8, "float32", 32, 128)
    assert calls == [32, 64, 128] and summary["N"] == 128 and "bound" in summary["note"]

    # each probe 1 s of wall time at N=32 (warm-up and autotuning included), 4x per doubling, while its
    # one timed call is 1 ms: the search stops before a probe would break the cap, judged by wall time
    clock = [0.0]
    monkeypatch.setattr(bench_max_n.time, "monotonic", lambda: clock[0])
    fake, calls = _fake_run_case()

    def slow_probe(case, out, **kw):
        clock[0] += (case.n / 32) ** 2
        return fake(case, out, **kw)

    monkeypatch.setattr(bench_max_n, "run_case", slow_probe)
    summary = bench_max_n.largest_n(s, "t", "clip", "chunked", 8, "float32", 32, 1 << 20, time_cap_s=30,
                                    call_cap_s=1000)
    assert calls == [32, 64, 128] and summary["N"] == 128 and "N=256 would take ~64 s" in summary["note"]

    fake, calls = _fake_run_case(oom_from=1)
    monkeypatch.setattr(bench_max_n, "run_case", fake)
    summary = bench_max_n.largest_n(s, "t", "clip", "reference", 8, "float32", 32, 1 << 20)
    assert summary["N"] is None and summary["status"] == "oom"
    # one summary per search survives (the last search of a provider wins, whatever N it reached)
    summaries = [r for r in R.latest(R.load([tmp_path / "r.jsonl"])) if r["kind"] == "max_n"]
    assert sorted((r["provider"], r["N"]) for r in summaries) == [("chunked", 128), ("reference", None)]


def test_largest_n_killed_mid_search_keeps_a_summary(tmp_path, monkeypatch):
    """A stage's time limit kills the process during a probe: the search's summary is already written."""
    s = Settings(out=tmp_path / "r.jsonl")
    fake, calls = _fake_run_case()

    def killed_at_128(case, out, **kw):
        if case.n == 128:
            raise KeyboardInterrupt  # stands in for the SIGTERM / SIGKILL of `timeout`
        return fake(case, out, **kw)

    monkeypatch.setattr(bench_max_n, "run_case", killed_at_128)
    with pytest.raises(KeyboardInterrupt):
        bench_max_n.largest_n(s, "t", "clip", "chunked", 8, "float32", 32, 1 << 20)
    [summary] = [r for r in R.latest(R.load([tmp_path / "r.jsonl"])) if r["kind"] == "max_n"]
    assert summary["N"] == 64 and summary["status"] == "ok" and "probing N=128" in summary["note"]


def test_a_broken_cuda_context_skips_the_rest_of_a_set(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    monkeypatch.setattr(M, "_cuda_device", lambda: torch.device("cpu"))  # GPU records on a CPU machine
    run_case, calls = _fake_run_case(broken_provider="triton")
    monkeypatch.setattr(M, "run_case", run_case)
    cases = [Case(provider=p, op="clip", n=64, d=8, dtype="bfloat16", mode="full", device="cuda")
             for p in ("chunked", "triton", "cuda", "reference")]
    recs = M.run_cases(cases, out)
    assert calls == [64, 64] and [r["status"] for r in recs] == ["ok", "error", "skipped", "skipped"]
    assert "broke the CUDA context (triton clip N=64)" in recs[2]["note"]
    assert len(R.load([out])) == 4

    # the largest-N set: the searches after the broken one are recorded as skipped, not run
    s = Settings(out=out, device="cuda", providers=["triton", "chunked", "reference"], tiny=True)
    monkeypatch.setattr(bench_max_n, "run_case", run_case)
    summaries = bench_max_n.gpu_max_n(s, n_max=1 << 12)
    assert [(r["provider"], r["op"], r["status"]) for r in summaries] == [
        ("triton", "clip", "error"), ("chunked", "clip", "skipped"), ("reference", "clip", "skipped"),
        ("triton", "full", "skipped"), ("chunked", "full", "skipped"), ("reference", "full", "skipped")]
    assert summaries[0]["cuda_context_broken"] and all(r["kind"] == "max_n" for r in summaries)


def test_cuda_cache_release_survives_a_broken_context(monkeypatch):
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", broken)
    M.release_cuda_cache()  # must not raise: the failing case's record is still to be written


def test_sweep_filters_and_tiny_shapes():
    s = Settings(tiny=True, providers=["chunked", "reference"], modes=["full"], ops=["clip"])
    # 4096 and 16384 both shrink to N = 16: measured once
    cases = sweep(s, "x", "clip", ["chunked", "open_clip", "reference"], [4096, 16384, 65536], [512], ["float32"],
                  ["forward", "full"])
    assert [(c.provider, c.n, c.d, c.mode) for c in cases] == [
        ("chunked", 16, 16, "full"), ("chunked", 64, 16, "full"),
        ("reference", 16, 16, "full"), ("reference", 64, 16, "full")]
    assert sweep(s, "x", "full", ["chunked"], [4096], [256], ["float32"]) == []


# ------------------------------------------------------------------------------------ render
def _rec(device_kind, device, provider, op, mode, n, ms, mem, status="ok", kind="timing", suite="gpu-core",
         dtype="bfloat16", d=512, note=None):
    rec = {key: None for key in R.FIELDS}
    rec.update(device_kind=device_kind, device=device, torch="2.11.0", triton="3.6.0", commit="abc123",
               date="2026-11-27T00:00:00Z", provider=provider, op=op, mode=mode, N=n, D=d, dtype=dtype,
               status=status, kind=kind, suite=suite, note=note, threads=2 if device_kind == "cpu" else None,
               flops=O.matmul_flops(op, mode, n, d))
    if status == "ok":
        rec.update(ms_median=ms, ms_p20=ms * 0.9, ms_p80=ms * 1.1, reps=5, peak_mem_mb=mem)
        R.add_rates(rec)
    return rec


def _synthetic_records():
    h100 = "NVIDIA H100 80GB HBM3"
    recs = [
        _rec("gpu", h100, "triton", "clip", "full", 32768, 10.0, 70.0),
        _rec("gpu", h100, "triton", "clip", "forward", 32768, 3.0, 30.0),
        _rec("gpu", h100, "reference", "clip", "full", 32768, 40.0, 20000.0),
        _rec("gpu", h100, "inf_cl", "clip", "full", 32768, None, None, status="unavailable", note="cannot import inf_cl"),
        _rec("gpu", h100, "compiled", "full", "full", 32768, None, None, status="oom", note="CUDA out of memory"),
        _rec("gpu", h100, "triton", "clip", "full", 65536, 40.0, 140.0, kind="probe", suite="gpu-maxn"),
        _rec("gpu", h100, "triton", "clip", "full", 131072, 160.0, 280.0, kind="probe", suite="gpu-maxn"),
        _rec("cpu", "AMD EPYC", "chunked", "clip", "full", 16384, 9000.0, 300.0, suite="cpu-core", dtype="float32"),
    ]
    best = dict(recs[6], kind="max_n", note="time cap: one fwd+bwd took 9.0 s at N=131072")
    return recs + [best]


def test_render_table_and_plots(tmp_path):
    recs = _synthetic_records()
    files = render.render_plots(recs, tmp_path / "plots")
    assert len(files) == 1 and files[0].suffix == ".png" and files[0].stat().st_size > 1000
    table = render.render_table(recs)
    assert "### GPU: NVIDIA H100 80GB HBM3" in table and "### CPU: AMD EPYC (2 threads)" in table
    assert table.index("### GPU") < table.index("### CPU")
    triton_row = next(line for line in table.splitlines() if line.startswith("| triton | 3.00"))
    # floor: 4 * 2 N^2 D flops at 790 TFLOP/s against 10 ms; speed-up vs reference 40 / 10
    floor = O.matmul_flops("clip", "full", 32768, 512) / 790e12 * 1e3 / 10.0
    assert f"{100 * floor:.0f}%" in triton_row and "4.00x" in triton_row and "10.0 (9.00–11.0)" in triton_row
    assert "n/a" in next(line for line in table.splitlines() if line.startswith("| inf_cl |"))
    assert "OOM" in table and "cannot import inf_cl" in table
    assert "| triton | clip | 512 | bf16 | 128K | 280 MiB | 160 | time cap" in table
    assert "commit abc123" in table


def test_update_readme_splices_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{render.START_MARKER}\nold table\n{render.END_MARKER}\noutro\n")
    render.update_readme("| new | table |\n", readme)
    assert readme.read_text() == f"intro\n{render.START_MARKER}\n| new | table |\n{render.END_MARKER}\noutro\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        render.update_readme("x", plain)
    assert plain.read_text() == "no markers\n"


def test_render_command_writes_the_table_file(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for rec in _synthetic_records():
        R.append(rec, results / f"{rec['device_kind']}.jsonl")
    readme = tmp_path / "README.md"
    readme.write_text(f"{render.START_MARKER}\n{render.END_MARKER}\n")
    from benchmarks.__main__ import main

    assert main(["render", str(results), "--plots-dir", str(tmp_path / "plots"), "--table",
                 str(tmp_path / "table.md"), "--update-readme", str(readme)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "NVIDIA H100" in table and table.strip() in readme.read_text()
    assert list((tmp_path / "plots").glob("*.png"))


def test_cli_rejects_unknown_provider_and_mode():
    from benchmarks.__main__ import main

    with pytest.raises(ValueError, match="provider"):
        main(["cpu-core", "--providers", "flash"])
    with pytest.raises(SystemExit):
        main(["cpu-core", "--modes", "sideways"])
    with pytest.raises(SystemExit):
        main(["no-such-set"])


@pytest.mark.slow
def test_suite_runs_end_to_end_at_tiny_shapes(tmp_path):
    # cpu-core's three parts through the same code the real run uses (subprocess per case).
    from benchmarks.__main__ import main

    out = tmp_path / "cpu.jsonl"
    assert main(["cpu-core", "--tiny", "--threads", "1", "--providers", "reference", "--min-time", "0.01",
                 "--reps", "1", "--out", str(out)]) == 0
    recs = R.load([out])
    assert {(r["op"], r["kind"]) for r in recs} == {("clip", "timing"), ("full", "timing"), ("clip_gc", "probe"),
                                                    ("clip_gc", "max_n")}
    assert all(r["status"] == "ok" for r in recs), [r["note"] for r in recs]


# --------------------------------------------------------------------------- gpu_check.sh
GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    usage = subprocess.run(["bash", str(GPU_CHECK), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--dry-run" in usage.stdout
    bad = subprocess.run(["bash", str(GPU_CHECK), "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
    bad = subprocess.run(["bash", str(GPU_CHECK), "--skip", "lunch"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


def test_gpu_check_without_a_gpu_stops_with_a_clear_message(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    env.pop("DRY_RUN", None)
    proc = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if "GPU: none" not in proc.stdout:
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 3 and "--dry-run" in proc.stdout


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    # The script's CPU-side steps: argument parsing, stage bookkeeping, the benchmark runner at tiny
    # shapes on the CPU (GPU-only providers recorded as unavailable), result writing and rendering.
    if not backend_available("triton"):
        pytest.skip("the script's Triton warm-up needs the triton backend")
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    env.pop("LSR_TEST_GPU", None)
    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--budget", "900", "--skip", "tests"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    assert {"summary.txt", "gpu.jsonl", "README_table.md", "bench.log", "env_build.log", "profile.txt"} <= set(files)
    recs = R.load([out / "gpu.jsonl"])
    status = {(r["provider"], r["kind"]): r["status"] for r in recs}
    assert status[("reference", "timing")] == "ok"
    assert status[("triton", "timing")] == "unavailable" and status[("inf_cl", "timing")] == "unavailable"
    if backend_available("chunked"):
        assert status[("chunked", "timing")] == "ok" and status[("chunked", "max_n")] == "ok"
    summary = (out / "summary.txt").read_text()
    assert "bench-core   ok" in summary and "profile      ok" in summary and "tests        skipped" in summary
    # the Triton cache warm-up ran its one dry-run op through the JIT launch path (stand-in driver)
    assert "warm-up      ok" in summary and "OK clip:" in (out / "env_build.log").read_text()
    profile = (out / "profile.txt").read_text()
    assert "-- chunked clip: the floor is 4 products" in profile and "-- triton clip" in profile


# ------------------------------------------------------------------------- auto's GPU choice
def _timed(provider, ms, op="clip", n=32768, d=512, dtype="bfloat16", status="ok", mode="full",
           device="NVIDIA H100 80GB HBM3"):
    rec = _rec("gpu", device, provider, op, mode, n, ms, 100.0, status=status, dtype=dtype, d=d)
    rec.update(capability="9.0", K=0)
    return rec


def test_choose_ranks_the_lsr_backends_per_shape():
    from benchmarks import choose

    recs = [
        _timed("triton", 9.0), _timed("cuda", 12.0), _timed("chunked", 30.0),
        _timed("reference", 5.0),                      # not an auto candidate
        _timed("cuda", 1.0, mode="forward"),           # forward alone does not decide
        _timed("triton", 2.0, n=1024), _timed("chunked", 1.5, n=1024),
        _timed("cuda", None, n=1024, status="error"),  # failed there: not ranked there
        _timed("triton", 50.0, op="full"), _timed("cuda", 40.0, op="full"),
        _rec("cpu", "AMD EPYC", "chunked", "clip", "full", 16384, 9000.0, 300.0, dtype="float32"),
    ]
    entries = choose.choose(recs + [_timed("triton", 8.0)])  # the later triton record wins
    got = {(e["op"], e["N"]): (e["ranking"], e["ms"]) for e in entries}
    assert got == {
        ("clip", 1024): (["chunked", "triton"], {"chunked": 1.5, "triton": 2.0}),
        ("clip", 32768): (["triton", "cuda", "chunked"], {"triton": 8.0, "cuda": 12.0, "chunked": 30.0}),
        ("full", 32768): (["cuda", "triton"], {"cuda": 40.0, "triton": 50.0}),
    }
    assert all(e["capability"] == "9.0" and e["device"] == "NVIDIA H100 80GB HBM3" and e["K"] == 0
               for e in entries)


def test_choose_writes_a_module_that_resolve_reads(tmp_path, monkeypatch):
    from benchmarks import choose
    from lsr_kernels import backends

    entries = choose.choose([_timed("triton", 9.0), _timed("cuda", 7.0), _timed("chunked", 30.0)])
    namespace = {}
    exec(choose.module_text(entries, "gpu.jsonl"), namespace)
    assert namespace["MEASURED"] == entries
    empty = {}
    exec(choose.module_text([], "gpu.jsonl"), empty)
    assert empty["MEASURED"] == []

    from lsr_kernels.backends import auto_choice
    monkeypatch.setattr(auto_choice, "MEASURED", namespace["MEASURED"])
    monkeypatch.setattr(backends, "_gpu_identity", lambda device: ("NVIDIA H200", "9.0"))
    usable = {"cuda", "triton", "chunked"}
    monkeypatch.setattr(backends, "_usable", lambda name: name in usable)
    cuda = torch.device("cuda")
    assert backends.resolve("auto", cuda, "clip", torch.bfloat16, (4096, 512, 0)) == "cuda"
    usable.discard("cuda")  # the extension did not load: the next fastest
    assert backends.resolve("auto", cuda, "clip", torch.bfloat16, (4096, 512, 0)) == "triton"
    # nothing measured for fp32 (or without an op): the default rule
    monkeypatch.setattr(backends, "_triton_usable", lambda: False)
    assert backends.resolve("auto", cuda, "clip", torch.float32, (4096, 512, 0)) == "chunked"
    assert backends.resolve("auto", cuda) == "chunked"
    assert backends.resolve("auto", torch.device("cpu"), "clip", torch.bfloat16, (4096, 512, 0)) == "chunked"
    assert backends.resolve("triton", cuda, "clip", torch.bfloat16, (4096, 512, 0)) == "triton"


def test_choose_command_and_readme(tmp_path):
    from benchmarks import choose
    from benchmarks.__main__ import main

    results = tmp_path / "gpu.jsonl"
    for rec in (_timed("triton", 9.0), _timed("cuda", 12.0), _timed("triton", 90.0, op="itc")):
        R.append(rec, results)
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{choose.AUTO_MARKERS[0]}\nold\n{choose.AUTO_MARKERS[1]}\nb\n")
    out = tmp_path / "auto_choice.py"
    assert main(["choose-auto", str(results), "--out", str(out), "--update-readme", str(readme)]) == 0
    namespace = {}
    exec(out.read_text(), namespace)
    assert [(e["op"], e["ranking"]) for e in namespace["MEASURED"]] == [("clip", ["triton", "cuda"]),
                                                                         ("itc", ["triton"])]
    text = readme.read_text()
    assert "| NVIDIA H100 80GB HBM3 | clip | bf16 | 32768 | 512 | 0 | `triton` | triton 9.00, cuda 12.0 |" in text
    assert text.startswith("a\n") and text.endswith(f"{choose.AUTO_MARKERS[1]}\nb\n") and "old" not in text


def test_committed_auto_choice_matches_the_committed_gpu_results():
    """auto_choice.py and the README's auto table are what choose-auto makes of results/gpu.jsonl."""
    from benchmarks import choose
    from lsr_kernels.backends import auto_choice

    entries = choose.choose(R.load([R.results_path("gpu")]))
    assert auto_choice.MEASURED == entries, "run `python -m benchmarks choose-auto --update-readme`"
    readme = (REPO / "README.md").read_text()
    start, end = choose.AUTO_MARKERS
    assert readme.split(start, 1)[1].split(end, 1)[0].strip() == choose.markdown(entries).strip()


# ------------------------------------------------------------------------------------ profile
def test_profile_table_counts_products_per_step():
    from benchmarks import profile

    rows = [("_softmax_ce_bwd_kernel", 6, 3000.0), ("_softmax_ce_fwd_kernel", 3, 1500.0), ("memset", 3, 30.0)]
    lines = profile.format_table(rows, steps=3, step_ms=1.6, product_ms=0.5, top=2)
    bwd = lines[1].split()
    assert bwd[0] == "_softmax_ce_bwd_kernel" and bwd[1:] == ["2", "1.000", "66.2%", "2.00"]
    assert lines[3].split()[:2] == ["(1", "others)"]
    # 4530 us over 3 steps = 1.51 ms of kernels = 3.02 products; the step took 1.6 ms = 3.2 products
    assert "device time 1.510 ms = 3.02 products; step = 3.20 products" in lines[-1]


def test_profile_names_cuda_kernels_briefly():
    from benchmarks.profile import short_name

    assert short_name("void lsr::(anonymous namespace)::info_nce_fwd_kernel<__nv_bfloat16, true>"
                      "(lsr::InfoNceFwdParams)") == "info_nce_fwd_kernel<__nv_bfloat16, true>"
    assert short_name("void lsr::row_norms_kernel(lsr::P)") == "row_norms_kernel"
    for kept in ("_softmax_ce_fwd_kernel", "Memset (Device)", "aten::mm"):
        assert short_name(kept) == kept


def test_profile_lists_the_triton_autotuner_choices(monkeypatch):
    """What the autotuner picked, per kernel and key (which configs win on the device)."""
    if not backend_available("triton"):
        pytest.skip("the triton backend is not usable here")
    from benchmarks import profile
    from lsr_kernels.backends import triton as T
    from lsr_kernels.backends.triton import softmax_ce

    tuned = softmax_ce._softmax_ce_bwd_tuned
    key = (32768, 32768, 512, True, True, False, True, "torch.bfloat16", "torch.float32")
    picked = next(c for c in softmax_ce.BACKWARD_CONFIGS if c.kwargs["FLATTEN"])
    monkeypatch.setattr(tuned, "cache", {key: picked})
    lines = T.autotune_choices()
    assert lines == ["_softmax_ce_bwd_kernel N_BUCKET=32768 M_BUCKET=32768 D_PADDED=512 HAS_OWN=True HAS_OTHER=True "
                     f"HAS_SOFT=False COMPUTE_DS=True bfloat16,float32 -> {picked}"]
    assert "FLATTEN: True" in lines[0]
    assert profile.triton_autotune_choices() == lines
    monkeypatch.setattr(tuned, "cache", {})
    assert profile.triton_autotune_choices()[0].startswith("(none")


def test_profile_runs_on_cpu(tmp_path):
    out = tmp_path / "profile.txt"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "profile", "--device", "cpu", "--tiny", "--ops", "clip",
                           "--providers", "reference,triton", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "-- reference clip: the floor is 4 products" in text and "aten::" in text
    assert "-- triton clip: the floor is 4 products: unavailable" in text
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "profile", "--ops", "clap"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "'clap' is not one of" in bad.stderr


def test_gpu_timing_gives_slow_calls_an_event_loop(monkeypatch):
    """do_bench would time a call slower than rep/3 fewer than 3 times (after 5 estimation calls):
    such calls get an event loop of at least 3 instead."""
    import triton.testing

    class FakeEvent:
        def __init__(self, enable_timing):
            pass

        def record(self):
            pass

        def elapsed_time(self, end):
            return 50.0

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: [10.0] * 10)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    case = Case(provider="triton", op="clip", n=64, d=8, dtype="bfloat16", mode="full", device="cuda", reps=1)
    assert M._time_cuda_ms(lambda: calls.append(1), case, first_call_ms=10.0) == [10.0] * 10 and not calls
    assert M._time_cuda_ms(lambda: calls.append(1), case, first_call_ms=50.0) == [50.0] * 3 and len(calls) == 3
