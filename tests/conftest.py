"""Test configuration: seeds, the `gpu` marker, the device fixture, the GPU run's order.

GPU tests run only with LSR_TEST_GPU=1 and a visible CUDA device; without them they are skipped at
run time (CUDA is never queried at import or collection time). On CPU the Triton backend runs under
its interpreter, which must be switched on before anything imports triton.

Under pytest-xdist with LSR_TEST_GPU=1 the tests marked ``gpu_cost(seconds)`` (a cold-start estimate:
Triton / inductor compiles, spawned processes, training runs), costliest first, head the first batch
of each worker, so the long ones start at once and on different workers (scripts/gpu_check.sh caps
the whole stage); everything else keeps its collection order. The layout follows `-n`'s default
"load" scheduling (a worker's first batch is a run of consecutive tests; the workers cannot see
which `--dist` the controller uses). With LSR_TEST_GPU=1 the Triton backend runs one config per
kernel unless LSR_TRITON_AUTOTUNE says otherwise, and xdist workers split the cores between them.
"""
import os

if os.environ.get("LSR_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One Triton config per kernel unless asked for more: autotuning would compile and time every
    # config for every shape the tests use (test_gpu_every_autotune_config runs each one explicitly).
    os.environ.setdefault("LSR_TRITON_AUTOTUNE", "0")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-xdist workers share the machine's cores: no inductor compile pool per worker
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest
import torch

if os.environ.get("LSR_TEST_GPU") == "1" and os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # ... nor a full intra-op thread pool each (CPU references, input generation)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def gpu_tests_enabled() -> bool:
    return os.environ.get("LSR_TEST_GPU") == "1" and torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu_cost(seconds): rough cold-start cost of a GPU test (compiles included); under "
                   "pytest-xdist with LSR_TEST_GPU=1 the costliest start first, one per worker")


def _gpu_cost(item) -> float:
    mark = item.get_closest_marker("gpu_cost")
    return float(mark.args[0]) if mark is not None else 0.0


@pytest.hookimpl(trylast=True)  # after `-m gpu` has deselected
def pytest_collection_modifyitems(config, items):
    # Environment only (no CUDA query at collection); every xdist worker computes the same order.
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if os.environ.get("LSR_TEST_GPU") != "1" or workers < 2:
        return
    costly = sorted((item for item in items if _gpu_cost(item) > 0), key=_gpu_cost, reverse=True)[:workers]
    if not costly:
        return
    chosen = set(map(id, costly))
    order = [item for item in items if id(item) not in chosen]
    # pytest-xdist's "load" scheduling first hands each worker a run of this many consecutive tests
    # (xdist.scheduler.load: len // workers // 4, at least 2): put one costly test at each run's head.
    run = max(2, len(items) // workers // 4)
    for i, item in enumerate(costly):
        order.insert(i * run, item)
    items[:] = order


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not gpu_tests_enabled():
        pytest.skip("GPU test: set LSR_TEST_GPU=1 on a machine with CUDA")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cuda_device():
    if not gpu_tests_enabled():
        pytest.skip("GPU test: set LSR_TEST_GPU=1 on a machine with CUDA")
    return torch.device("cuda")
