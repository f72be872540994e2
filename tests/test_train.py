"""The reference training loop `lsr-train` (lsr_kernels.train) on CPU with a tiny model.

- backend parity: 12 steps of CLIP and of ALBEF (all regularisers on) from one seed give the same
  per-step losses with backend="reference" and "chunked" (relative gap < 1e-4) and close weights;
  the Triton backend (interpreter) the same on the first steps of a tinier run;
- resume: a run stopped after 5 steps and resumed repeats the uninterrupted run bit for bit
  (history, weights, ALBEF's queues and momentum copies, the optimiser state);
- bad input raises before training: unknown --reg, --steps 0 or negative, a CSV with a missing column
  or an unreadable image, a resume that changes the trajectory;
- main() writes metrics.json with the documented keys and the PNG; --compare prints the table.
"""
import csv
import json
import os
import sys

import pytest
import torch

from helpers import backend_available, require_cuda_extension
from lsr_kernels import train as T

# Small enough for the CPU (and for the Triton interpreter), big enough to exercise every path:
# queue (40) longer than the batch (16), width not a power of two in the joint space (D = 6).
TINY = ["--width", "16", "--layers", "1", "--heads", "2", "--embed-dim", "6", "--batch-size", "16",
        "--image-size", "8", "--context-length", "12", "--queue-size", "40", "--warmup", "2", "--lr", "3e-3",
        "--eval-every", "0", "--no-progress"]
PARITY_STEPS = 12
LOSS_RTOL = 1e-4
WEIGHT_RTOL = 1e-3  # 12 AdamW steps amplify fp32 rounding differences of the loss a little


def _argv(model, backend, out, steps=PARITY_STEPS, reg="all", extra=()):
    return ["--model", model, "--reg", reg, "--backend", backend, "--steps", str(steps), "--out", str(out),
            *TINY, *extra]


def _losses(history, key="loss"):
    return torch.tensor([h[key] for h in history], dtype=torch.float64)


def _assert_same_losses(ref, other, terms, what):
    """Every step's total loss within LOSS_RTOL; each term within LOSS_RTOL of that step's total.

    A term is measured against the total because a term that is tiny next to the total (the
    geometric term early in training, say) has a relative error dominated by fp32 rounding of its
    own small value, which means nothing for training.
    """
    total = _losses(ref).abs().clamp_min(1e-6)
    for key in terms:
        a, b = _losses(ref, key), _losses(other, key)
        gap = ((a - b).abs() / (a.abs().clamp_min(1e-6) if key == "loss" else total)).max().item()
        assert gap < LOSS_RTOL, f"{what} {key}: relative gap {gap:.2e} to the reference"


def _state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Lazily computed full runs shared by the tests of this module: {(model, backend): out dir}."""
    cache = {}
    root = tmp_path_factory.mktemp("runs")

    def get(model, backend):
        key = (model, backend)
        if key not in cache:
            out = root / f"{model}-{backend}"
            assert T.main(_argv(model, backend, out)) == 0  # through the CLI entry point
            cache[key] = str(out)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def gpu_reference_history(tmp_path_factory):
    """The reference's 12-step history on the GPU, once per model (per worker under xdist)."""
    cache = {}

    def get(model):
        if model not in cache:
            out = tmp_path_factory.mktemp(f"gpu-reference-{model}")
            assert T.main(_argv(model, "reference", out, extra=("--device", "cuda",))) == 0
            cache[model] = _metrics(out)["history"]
        return cache[model]

    return get


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("model", ["clip", "albef"])
def test_reference_and_chunked_follow_the_same_trajectory(runs, model):
    if not backend_available("chunked"):
        pytest.skip("chunked backend not available")
    ref, chunked = _metrics(runs(model, "reference")), _metrics(runs(model, "chunked"))
    assert len(ref["history"]) == len(chunked["history"]) == PARITY_STEPS
    terms = [k for k in ref["history"][0] if k not in ("step", "lr")]
    assert {"loss", "separation_loss", "bridge_loss", "geometric_loss"} <= set(terms)
    _assert_same_losses(ref["history"], chunked["history"], terms, f"{model} chunked")
    assert _losses(ref["history"])[-1] < _losses(ref["history"])[0]  # it trains
    wa, wb = _state(runs(model, "reference"))["model"], _state(runs(model, "chunked"))["model"]
    for name, a in wa.items():
        if a.is_floating_point():
            err = ((a.double() - wb[name].double()).norm() / a.double().norm().clamp_min(1e-12)).item()
            assert err < WEIGHT_RTOL, f"{model} {name}: weights differ by {err:.2e}"


@pytest.mark.slow
def test_triton_interpreter_matches_reference_on_first_steps(runs, tmp_path):
    """The first steps of the same run with the Triton kernels (under TRITON_INTERPRET=1 on CPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not backend_available("triton"):
        pytest.skip("needs the Triton backend and TRITON_INTERPRET=1")
    steps = 3
    args = T.parse_args(_argv("clip", "triton", tmp_path))
    triton_run = T.train(args, stop_after=steps, log=lambda s: None)  # same schedule as the 12-step run
    ref = _metrics(runs("clip", "reference"))["history"][:steps]
    _assert_same_losses(ref, triton_run["history"],
                        ("loss", "contrastive_loss", "separation_loss", "bridge_loss", "geometric_loss"), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [pytest.param("chunked", marks=pytest.mark.gpu_cost(10)),
                                     pytest.param("triton", marks=pytest.mark.gpu_cost(30)),  # ~10 Triton compiles
                                     pytest.param("cuda", marks=pytest.mark.gpu_cost(10))])
@pytest.mark.parametrize("model", ["clip", "albef"])
def test_gpu_backends_follow_the_reference_trajectory(cuda_device, gpu_reference_history, tmp_path, model, backend):
    """The 12-step parity run on the GPU: each fused backend against the reference, same device."""
    if backend == "cuda":
        require_cuda_extension()  # before the reference run: a missing build skips at no cost
    out = tmp_path / backend
    assert T.main(_argv(model, backend, out, extra=("--device", "cuda",))) == 0
    ref, other = gpu_reference_history(model), _metrics(out)["history"]
    terms = [k for k in ref[0] if k not in ("step", "lr")]
    _assert_same_losses(ref, other, terms, f"{model} {backend} on cuda")


# --------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("model", ["clip", "albef"])
def test_resume_continues_the_same_trajectory(runs, tmp_path, model):
    backend = "chunked" if backend_available("chunked") else "reference"
    full = runs(model, backend)
    out = tmp_path / "interrupted"
    T.train(T.parse_args(_argv(model, backend, out)), stop_after=5, log=lambda s: None)
    assert _state(out)["step"] == 5
    # No --steps: a resumed run keeps its checkpoint's total (and so its learning-rate schedule).
    assert T.main(["--resume", str(out), "--backend", backend, "--no-progress"]) == 0
    resumed, uninterrupted = _metrics(out), _metrics(full)
    assert [h["step"] for h in resumed["history"]] == list(range(1, PARITY_STEPS + 1))
    assert resumed["history"] == uninterrupted["history"]  # bit for bit, every term of every step
    a, b = _state(out), _state(full)
    for name, tensor in b["model"].items():  # includes ALBEF's momentum copies and queues
        assert torch.equal(a["model"][name], tensor), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pb)
    assert resumed["retrieval_r1"] == uninterrupted["retrieval_r1"]


def test_resume_refuses_to_change_the_trajectory(runs, capsys):
    out = runs("clip", "reference")
    with pytest.raises(SystemExit):
        T.parse_args(["--resume", out, "--lr", "0.5"])
    assert "--lr 0.5 differs from the checkpoint's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.parse_args(["--resume", os.path.join(out, "nothing-here.pt")])
    assert "no checkpoint" in capsys.readouterr().err
    assert T.parse_args(["--resume", out]).steps == 12  # the checkpoint's total
    assert T.parse_args(["--resume", out, "--steps", "40"]).steps == 40  # extends the run
    args = T.parse_args(["--resume", out, "--steps", "3"])
    with pytest.raises(ValueError, match="--steps 3 is below the checkpoint's step 12"):
        T.train(args, log=lambda s: None)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, message", [
    (["--reg", "orthogonal"], "unknown regulariser 'orthogonal'"),
    (["--reg", "none,sep"], "cannot be combined"),
    (["--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["--steps", "-5"], "--steps: expected a positive integer, got -5"),
    (["--batch-size", "1"], "--batch-size: expected >= 2"),
    (["--lr", "-1"], "--lr"),
    (["--reg", "br", "--sep-weight", "2"], "--sep-weight was given but --reg br"),
    (["--backend", "magic"], "--backend"),
    (["--compare", "--resume", "x"], "cannot be combined"),
    (["--compare", "--reg", "gc"], "--compare trains its own set of regularisers (clip: none, sep, br, gc); --reg gc"),
    (["--image-size", "10", "--patch-size", "4"], "not a multiple of --patch-size"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        T.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_regulariser_weights_default_to_the_paper():
    assert T.regulariser_weights(T.parse_args([])) == {"sep": 1.0, "br": 1.0, "gc": 0.25}
    assert T.regulariser_weights(T.parse_args(["--reg", "none"])) == {"sep": 0.0, "br": 0.0, "gc": 0.0}
    assert T.regulariser_weights(T.parse_args(["--reg", "gc,sep", "--gc-weight", "0.5"])) == \
        {"sep": 1.0, "br": 0.0, "gc": 0.5}


def _csv_dataset(tmp_path, n=12, broken_row=None):
    from PIL import Image

    rows = []
    for i in range(n):
        name = f"im{i}.png"
        if i == broken_row:
            (tmp_path / name).write_bytes(b"\x89PNG but not really")
        else:
            Image.new("RGB", (10, 10), color=(i * 20 % 256, 255 - i * 20 % 256, 128)).save(tmp_path / name)
        rows.append((name, f"a {'red' if i % 2 else 'blue'} square number {i % 3}"))
    path = tmp_path / "train.tsv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(("filepath", "title"))
        writer.writerows(rows)
    return str(path)


CSV_TINY = ["--width", "16", "--layers", "1", "--heads", "2", "--embed-dim", "6", "--batch-size", "4",
            "--image-size", "8", "--eval-every", "0", "--no-progress", "--val-fraction", "0.25"]


@pytest.mark.parametrize("extra, broken_row, message", [
    (["--csv-caption-key", "caption"], None, "--csv-caption-key: column 'caption' not in the header"),
    (["--csv-img-key", "path"], None, "--csv-img-key: column 'path' not in the header"),
    ([], 7, "line 9: cannot read image"),
])
def test_bad_csv_fails_before_training(tmp_path, capsys, extra, broken_row, message):
    path = _csv_dataset(tmp_path, broken_row=broken_row)
    out = tmp_path / "out"
    assert T.main(["--csv", path, "--out", str(out), "--steps", "2", *CSV_TINY, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing trained, nothing written
    with pytest.raises(ValueError, match=message.split(":")[0]):
        T.train(T.parse_args(["--csv", path, "--out", str(out), "--steps", "2", *CSV_TINY, *extra]))


def test_missing_train_extra_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    assert T.main(["--out", str(tmp_path / "out"), "--steps", "1", "--no-progress"]) == 2
    assert "sklearn.datasets is missing: lsr-train needs the [train] extra" in capsys.readouterr().err


def test_user_csv_trains_end_to_end(tmp_path):
    path = _csv_dataset(tmp_path)
    out = tmp_path / "out"
    assert T.main(["--csv", path, "--out", str(out), "--steps", "3", "--model", "albef", "--queue-size", "8",
                   *CSV_TINY]) == 0
    metrics = _metrics(out)
    assert metrics["zero_shot_acc"] is None  # no classes in user data
    assert 0.0 <= metrics["retrieval_r1"] <= 1.0
    assert metrics["train_pairs"] == 9 and metrics["held_out_pairs"] == 3


# ---------------------------------------------------------------------------------------- smoke
def test_main_writes_metrics_and_plot(runs):
    out = runs("clip", "reference")
    metrics = _metrics(out)
    for key in ("model", "reg", "backend", "steps", "final_loss", "zero_shot_acc", "retrieval_r1", "history"):
        assert key in metrics, key
    assert metrics["model"] == "clip" and metrics["reg"] == "all" and metrics["backend"] == "reference"
    assert metrics["steps"] == PARITY_STEPS and len(metrics["history"]) == PARITY_STEPS
    entry = metrics["history"][-1]
    assert {"loss", "contrastive_loss", "separation_loss", "bridge_loss", "geometric_loss"} <= set(entry)
    assert metrics["final_loss"] == entry["loss"]
    assert 0.0 <= metrics["zero_shot_acc"] <= 1.0
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_prints_the_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert T.main(["--compare", "--steps", "2", "--out", str(out), "--backend", "reference", *TINY]) == 0
    printed = capsys.readouterr().out
    for row in ("CLIP  ", "CLIP + sep", "CLIP + br", "CLIP + gc"):
        assert row in printed
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary) == ["none", "sep", "br", "gc"]
    assert all((out / reg / "metrics.json").exists() for reg in summary)
