"""Test configuration: seeds, the `gpu` marker, the device fixture.

GPU tests run only with LSR_TEST_GPU=1 and a visible CUDA device; without them they are skipped at
run time (CUDA is never queried at import or collection time). On CPU the Triton backend runs under
its interpreter, which must be switched on before anything imports triton.
"""
import os

if os.environ.get("LSR_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def gpu_tests_enabled() -> bool:
    return os.environ.get("LSR_TEST_GPU") == "1" and torch.cuda.is_available()


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
