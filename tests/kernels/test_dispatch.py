"""Backend choice: defaults, overrides, and proof that the Triton path really runs."""

from __future__ import annotations

import pytest
import torch

import sau_kernels as K
import sau_kernels.accumulate as acc_mod
import sau_kernels.adamw as adamw_mod
import sau_kernels.select as select_mod
from sau_kernels._common import resolve_backend
from tests.helpers import triton_runnable


def test_default_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("SAU_BACKEND", raising=False)
    assert resolve_backend(None, torch.zeros(1)) == "torch"


def test_env_overrides_default_and_argument_overrides_env(monkeypatch):
    monkeypatch.setenv("SAU_BACKEND", "torch")
    assert resolve_backend(None, torch.zeros(1)) == "torch"
    assert resolve_backend("torch", torch.zeros(1)) == "torch"


def test_unknown_backend_refused(monkeypatch):
    monkeypatch.delenv("SAU_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.zeros(1))
    monkeypatch.setenv("SAU_BACKEND", "numba")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(None, torch.zeros(1))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.zeros(1))


@pytest.mark.skipif(not triton_runnable(), reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_path_really_runs(monkeypatch, device):
    # The PyTorch paths are booby-trapped: any silent fallback fails the test.
    def trap(*args, **kwargs):
        raise AssertionError("the PyTorch path ran although backend='triton' was asked")

    ran = []

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            ran.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in (
        (acc_mod, "_accumulate_torch"),
        (select_mod, "_select_torch"),
        (adamw_mod, "_masked_adamw_torch"),
    ):
        monkeypatch.setattr(module, name, trap)
    spy(acc_mod, "_accumulate_triton")
    spy(select_mod, "_select_triton")
    spy(adamw_mod, "_masked_adamw_triton")

    g = torch.randn(100, device=device)
    acc = torch.zeros(100, device=device)
    K.accumulate_sq_grad_(acc, g, backend="triton")
    sel = K.select_topk(acc, g, 0.5, backend="triton")
    K.masked_adamw_(
        g.clone(),
        g,
        torch.zeros(sel.n_selected, device=device),
        torch.zeros(sel.n_selected, device=device),
        sel.index,
        step=1,
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        backend="triton",
    )
    assert ran == ["_accumulate_triton", "_select_triton", "_masked_adamw_triton"]
