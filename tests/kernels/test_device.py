"""Triton launchers run under their tensors' CUDA device, not the current one.

The real check needs two GPUs (tensors on cuda:1 while cuda:0 is current) and skips
without them; the decorator itself is checked everywhere with a stand-in device context.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import sau_kernels as K
from sau_kernels import accumulate, adamw, radix
from sau_kernels import reference as R
from sau_kernels._common import launch_on_tensor_device

LAUNCHERS = [
    accumulate._accumulate_triton,
    radix._histogram_triton,
    radix._first_pass_triton,
    radix._split_triton,
    radix._candidate_pass_triton,
    radix._candidate_select_triton,
    radix._write_triton,
    adamw._masked_adamw_triton,
]


def test_launcher_runs_inside_the_tensors_device_context(monkeypatch):
    events = []

    @contextlib.contextmanager
    def fake_device(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    monkeypatch.setattr(torch.cuda, "device", fake_device)

    @launch_on_tensor_device
    def launcher(t, value):
        events.append(("launch", value))
        return value * 2

    on_gpu1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert launcher(on_gpu1, 21) == 42
    assert events == [("enter", on_gpu1.device), ("launch", 21), ("exit", on_gpu1.device)]
    events.clear()
    assert launcher(torch.zeros(1), 1) == 2  # CPU tensors (the interpreter): no context
    assert events == [("launch", 1)]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda f: f.__name__)
def test_every_triton_launcher_is_guarded(launcher):
    assert getattr(launcher, "__wrapped__", None) is not None, launcher.__name__


def _two_gpus() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices and triton")
def test_kernels_on_the_second_gpu_while_the_first_is_current():
    dev = torch.device("cuda", 1)
    gen = torch.Generator().manual_seed(0)
    with torch.cuda.device(0):
        grad = torch.randn(5000, generator=gen).to(dev)
        acc = torch.rand(5000, generator=gen).to(dev)
        want = R.accumulate_sq_grad_(acc.clone(), grad, scale=0.5)
        got = K.accumulate_sq_grad_(acc.clone(), grad, scale=0.5, backend="triton")
        torch.testing.assert_close(got, want, atol=0, rtol=1e-6)

        weight = torch.randn(4097, generator=gen).to(dev)
        weight[::3] = 0
        scores = torch.rand(4097, generator=gen).to(dev)
        sel = K.select_topk(scores, weight, 0.3, backend="triton")
        ref = R.select_topk(scores, weight, 0.3)
        assert torch.equal(sel.index, ref.index) and torch.equal(sel.threshold, ref.threshold)
        assert sel.index.device == dev

        param = torch.randn(4097, generator=gen).to(dev)
        m, v = torch.zeros(ref.n_selected, device=dev), torch.zeros(ref.n_selected, device=dev)
        hp = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        p_ref, m_ref, v_ref = param.clone(), m.clone(), v.clone()
        R.masked_adamw_(p_ref, scores, m_ref, v_ref, ref.index, **hp)
        K.masked_adamw_(param, scores, m, v, ref.index, backend="triton", **hp)
        for a, b in ((param, p_ref), (m, m_ref), (v, v_ref)):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=2e-6)
        assert torch.cuda.current_device() == 0  # the guard restored the caller's device
