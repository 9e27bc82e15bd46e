"""Layouts and sizes the kernels must handle: non-contiguous read-only inputs (scores,
weight, grad) give the contiguous result, and the index dtype switches at 2**31."""

from __future__ import annotations

import torch

import sau_kernels as K
from sau_kernels import reference as R
from sau_kernels._common import index_dtype


def test_index_dtype_switches_exactly_at_two_to_the_31():
    assert index_dtype(0) == torch.int32
    # docs/method.md: int32 while numel < 2**31 (the largest flat index, 2**31 - 2, fits).
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64
    assert index_dtype(2**31 + 1) == torch.int64


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (a transposed view of a copy)."""
    view = t.t().contiguous().t()
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def test_select_topk_non_contiguous_scores_and_weight(backend, device):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 45, generator=gen)
    weight[torch.rand(37, 45, generator=gen) < 0.5] = 0
    scores = torch.rand(37, 45, generator=gen)
    weight, scores = weight.to(device), scores.to(device)
    want = R.select_topk(scores, weight, 0.3)
    for s, w in ((_transposed(scores), weight), (scores, _transposed(weight))):
        got = K.select_topk(s, w, 0.3, backend=backend)
        assert torch.equal(got.index.cpu(), want.index.cpu())
        assert torch.equal(got.threshold.cpu(), want.threshold.cpu())
        assert got.n_selected == want.n_selected and got.n_survivors == want.n_survivors


def test_accumulate_non_contiguous_grad(backend, device):
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(63, 17, generator=gen).to(device)
    acc = torch.rand(63, 17, generator=gen).to(device)
    want = R.accumulate_sq_grad_(acc.clone(), grad, scale=0.25)
    got = K.accumulate_sq_grad_(acc.clone(), _transposed(grad), scale=0.25, backend=backend)
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)


def test_masked_adamw_non_contiguous_grad(backend, device):
    gen = torch.Generator().manual_seed(2)
    param = torch.randn(31, 29, generator=gen).to(device)
    grad = torch.randn(31, 29, generator=gen).to(device)
    index = torch.nonzero(torch.rand(31 * 29, generator=gen) < 0.3).view(-1).int().to(device)
    m = (torch.randn(index.numel(), generator=gen) * 0.1).to(device)
    v = (torch.rand(index.numel(), generator=gen) * 0.01).to(device)
    hp = dict(step=2, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    want = [t.clone() for t in (param, m, v)]
    K.masked_adamw_(want[0], grad, want[1], want[2], index, backend=backend, **hp)
    got = [t.clone() for t in (param, m, v)]
    K.masked_adamw_(got[0], _transposed(grad), got[1], got[2], index, backend=backend, **hp)
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # same backend, same values: bitwise
