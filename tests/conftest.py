"""Shared test fixtures.

Backends: "torch" always runs. "triton" runs on a CUDA device, or on the CPU when the
session was started with TRITON_INTERPRET=1 (the interpreter); otherwise it is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import triton_runnable

# Under pytest-xdist (`make test` runs two workers) each worker keeps to one intra-op
# thread, and so do the processes it spawns: two workers with two threads each on two
# cores are the oversubscription `one_thread` describes.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if triton_runnable() else [])


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, restoring the count afterwards.

    Why: on a loaded 2-core machine libgomp's default (active) wait policy made tiny
    model steps ~75x slower with 2 threads than with 1 (0.92 s vs 0.012 s a step).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
