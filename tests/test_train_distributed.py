"""`lsr-train` under torchrun with DDP (gloo on CPU) against one process holding the global batch.

- CLIP with every regulariser and both views, on 2 and 4 ranks and in ring mode: the same per-step
  losses (every term, relative gap < 1e-5) and the same final weights as one process;
- ALBEF on 2 and 4 ranks: every term (ITC, ITM with hard negatives from the global batch, MLM, the
  regularisers) on every step, the weights and the queues after the run;
- a job stopped after 2 steps and resumed with ``--resume`` continues the same trajectory;
- ``--compare`` under torchrun: every run on both ranks, one table from rank 0;
- a global batch that does not split over the ranks fails on every rank with a clear message;
- the shard-aware augmentation: the ranks' crops, put together, are the single process's.

Each run is a real `torchrun --standalone` job in a subprocess with a timeout, so a hang fails the
test instead of stalling the suite.
"""
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from lsr_kernels import train as T
from lsr_kernels.augment import random_resized_crop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--width", "16", "--layers", "1", "--heads", "2", "--embed-dim", "6", "--batch-size", "16",
        "--image-size", "8", "--context-length", "12", "--queue-size", "40", "--warmup", "2", "--lr", "3e-3",
        "--eval-every", "0", "--no-progress", "--device", "cpu"]
STEPS = 4
LOSS_RTOL = 1e-5  # measured ~1e-6: the ranks sum the same terms in another order
WEIGHT_RTOL = 1e-4
JOB_TIMEOUT_S = 240


# Imported by every Python process of a job (PYTHONPATH): a worker that reached the interpreter's
# teardown leaves a file. lsr-train's workers must end with os._exit once their group is destroyed,
# since that teardown can abort a finished run (train.exit_worker).
TEARDOWN_PROBE = """import atexit, os
if "LOCAL_RANK" in os.environ:
    atexit.register(lambda: open(os.path.join(os.environ["LSR_TEARDOWN_DIR"], "rank" + os.environ["RANK"]), "w").close())
"""


def _torchrun(world, argv, expect_ok=True):
    """Run ``lsr_kernels.train`` under ``torchrun --standalone`` on ``world`` CPU ranks and check that
    every worker ended without the interpreter's teardown, failed or not."""
    with tempfile.TemporaryDirectory(prefix="lsr-site-") as site:
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(TEARDOWN_PROBE)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, REPO, os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", LSR_TEARDOWN_DIR=site)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "lsr_kernels.train", *argv]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        if expect_ok:
            assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        torn_down = sorted(name for name in os.listdir(site) if name.startswith("rank"))
    assert not torn_down, f"workers went through interpreter teardown: {torn_down}\n{proc.stderr[-3000:]}"
    return proc


def _history(out):
    return T.json.load(open(os.path.join(out, "metrics.json")))["history"]


def _weights(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]


def _assert_same_steps(one, many, what, keys=None):
    assert [h["step"] for h in one] == [h["step"] for h in many], what
    for a, b in zip(one, many):
        for key in keys or [k for k in a if k not in ("step", "lr")]:
            gap = abs(a[key] - b[key]) / max(abs(a[key]), 1e-6)
            assert gap < LOSS_RTOL, f"{what}: step {a['step']} {key} {b[key]} vs one process {a[key]} (gap {gap:.1e})"


def _assert_same_weights(one, many, what):
    """Relative to the whole model: a parameter whose true gradient is ~0 (an attention key bias,
    which the softmax cannot see) takes AdamW steps of full size from rounding noise of either sign,
    so per tensor it may differ by O(lr) while the model does not."""
    names = [n for n, a in one.items() if a.is_floating_point() and "queue" not in n]
    diff = torch.cat([(one[n].double() - many[n].double()).flatten() for n in names]).norm()
    norm = torch.cat([one[n].double().flatten() for n in names]).norm()
    assert (diff / norm).item() < WEIGHT_RTOL, f"{what}: weights differ by {(diff / norm).item():.2e} from one process"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Single-process runs with the global batch: {model: out dir}."""
    cache = {}

    def get(model, steps):
        if (model, steps) not in cache:
            out = tmp_path_factory.mktemp(f"{model}-single")
            assert T.main(["--model", model, "--reg", "all", "--steps", str(steps), "--out", str(out), *TINY]) == 0
            cache[model, steps] = str(out)
        return cache[model, steps]

    return get


@pytest.mark.parametrize("world, mode", [(2, "gather"), (2, "ring"), (4, "gather")])
def test_clip_under_torchrun_follows_the_single_process_trajectory(one_process, tmp_path, world, mode):
    single = one_process("clip", STEPS)
    out = tmp_path / f"w{world}-{mode}"
    proc = _torchrun(world, ["--model", "clip", "--reg", "all", "--steps", str(STEPS), "--out", str(out),
                             "--distributed-mode", mode, *TINY])
    assert f"x {world} ranks (DDP, {mode})" in proc.stdout
    _assert_same_steps(_history(single), _history(out), f"CLIP on {world} ranks ({mode})")
    _assert_same_weights(_weights(single), _weights(out), f"CLIP on {world} ranks ({mode})")
    assert T.json.load(open(out / "metrics.json"))["world_size"] == world


@pytest.mark.parametrize("world", [2, 4])
def test_albef_under_torchrun_follows_the_single_process_trajectory(one_process, tmp_path, world):
    """Every ALBEF term (ITC with the queues, ITM with hard negatives from the global batch, MLM with
    the global token count, the regularisers), the weights and the queues after the run."""
    single = one_process("albef", STEPS)
    out = tmp_path / f"albef-w{world}"
    _torchrun(world, ["--model", "albef", "--reg", "all", "--steps", str(STEPS), "--out", str(out), *TINY])
    _assert_same_steps(_history(single), _history(out), f"ALBEF on {world} ranks")
    one, many = _weights(single), _weights(out)
    _assert_same_weights(one, many, f"ALBEF on {world} ranks")
    queues = [k for k in one if "queue" in k]
    assert queues
    for name in queues:
        torch.testing.assert_close(many[name].double(), one[name].double(), rtol=0, atol=1e-4, msg=name)


def test_a_torchrun_job_resumes_from_its_checkpoint(tmp_path):
    """2 steps on 2 ranks, then --resume to 4 steps on 2 ranks: the same history and weights as one
    process doing the same (its learning-rate schedule follows --steps of each call)."""
    argv = ["--model", "clip", "--reg", "all", *TINY]
    single, many = tmp_path / "single", tmp_path / "ranks"
    assert T.main(["--steps", "2", "--out", str(single), *argv]) == 0
    assert T.main(["--steps", str(STEPS), "--resume", str(single), "--out", str(single), *argv]) == 0
    _torchrun(2, ["--steps", "2", "--out", str(many), *argv])
    proc = _torchrun(2, ["--steps", str(STEPS), "--resume", str(many), "--out", str(many), *argv])
    assert f"resumed clip from {many / 'checkpoint.pt'} at step 2" in proc.stdout
    _assert_same_steps(_history(single), _history(many), "CLIP resumed on 2 ranks")
    _assert_same_weights(_weights(single), _weights(many), "CLIP resumed on 2 ranks")


def test_compare_under_torchrun_writes_one_table(tmp_path):
    out = tmp_path / "compare"
    proc = _torchrun(2, ["--model", "clip", "--compare", "--steps", "2", "--out", str(out), *TINY])
    assert proc.stdout.count("zero-shot acc") == 1  # rank 0 prints the table once
    table = (out / "compare.txt").read_text()
    assert all(label in table for label in ("CLIP + sep", "CLIP + br", "CLIP + gc"))
    assert T.json.load(open(out / "gc" / "metrics.json"))["world_size"] == 2


def test_a_batch_that_does_not_split_fails_on_every_rank(tmp_path):
    argv = ["--steps", "2", "--out", str(tmp_path / "bad"), *TINY]
    argv[argv.index("--batch-size") + 1] = "15"
    proc = _torchrun(2, argv, expect_ok=False)
    assert proc.returncode != 0
    message = "--batch-size 15 (the global batch) must split into 2 equal rank batches"
    assert proc.stderr.count(message) == 2, proc.stderr[-4000:]
    assert not (tmp_path / "bad" / "metrics.json").exists()


@pytest.mark.parametrize("count", [1, 2, 3])
def test_sharded_crops_put_together_are_the_global_crops(count):
    images = torch.rand(6, 1, 8, 8)
    full = random_resized_crop(images, torch.Generator().manual_seed(5), hflip_p=0.5)
    n = 6 // count
    parts = [random_resized_crop(images[i * n:(i + 1) * n], torch.Generator().manual_seed(5), hflip_p=0.5,
                                 shard=(i, count)) for i in range(count)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=0)


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0)])
def test_bad_shard_is_rejected(shard):
    with pytest.raises(ValueError, match="shard: expected"):
        random_resized_crop(torch.rand(2, 1, 4, 4), torch.Generator(), shard=shard)
