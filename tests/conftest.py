"""Shared test fixtures.

Backends: "torch" always runs. "triton" runs on a CUDA device, or on the CPU when the
session was started with TRITON_INTERPRET=1 (the interpreter); otherwise it is skipped.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import triton_runnable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if triton_runnable() else [])


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
