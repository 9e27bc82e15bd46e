"""select_global: one threshold over many layers, bitwise equal to a sort of the concatenation."""

from __future__ import annotations

import math

import pytest
import torch

import sau_kernels as K
from sau_kernels import radix
from sau_kernels import reference as R


def make_layers(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 45), (63,), (1,), (0,), (4097,), (8, 8)]
    out = []
    for i, shape in enumerate(shapes):
        w = torch.randn(shape, generator=gen)
        if i != 5:  # (8, 8): nothing pruned
            w[torch.rand(shape, generator=gen) < 0.5] = 0
        # layers on different scales, as saliency of different layers is
        s = torch.rand(shape, generator=gen) ** 3 * 10.0 ** (i - 3)
        out.append((s.to(device), w.to(device)))
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.index.dtype == b.index.dtype and torch.equal(a.index.cpu(), b.index.cpu())
        assert torch.equal(a.threshold.cpu(), b.threshold.cpu())  # bitwise
        assert (a.n_survivors, a.n_selected) == (b.n_survivors, b.n_selected)
        for f in ("importance_pruned", "importance_survivors", "importance_selected"):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == torch.float64 and x.dim() == 0
            torch.testing.assert_close(x.cpu(), y.cpu(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("k", [1.0, 0.3, 0.05, 1e-9])
def test_bitwise_equal_to_sort_over_concatenated_survivors(backend, device, k):
    layers = make_layers(device)
    got = K.select_global([s for s, _ in layers], [w for _, w in layers], k, backend=backend)
    assert_same(got, R.select_global([s for s, _ in layers], [w for _, w in layers], k))
    # from first principles: one tau for all; fewer than r above it, at least r at/above
    values = torch.cat([s.view(-1)[w.view(-1) != 0] for s, w in layers]).cpu()
    r = math.ceil(k * values.numel() - 1e-9)
    finite = {float(sel.threshold) for sel in got} - {math.inf}  # inf: layer selects none
    assert len(finite) == 1
    tau = finite.pop()
    assert int((values > tau).sum()) < r <= int((values >= tau).sum())
    assert sum(sel.n_selected for sel in got) == int((values >= tau).sum())


def test_single_layer_equals_select_topk(backend, device):
    s, w = make_layers(device)[4]
    (got,) = K.select_global([s], [w], 0.3, backend=backend)
    want = K.select_topk(s, w, 0.3, backend=backend)
    assert torch.equal(got.index, want.index) and torch.equal(got.threshold, want.threshold)


def test_ties_zero_saliency_all_pruned_and_single_survivor(backend, device):
    scores = [
        torch.tensor([5.0, 3.0, 3.0, 0.0], device=device),
        torch.tensor([3.0, 3.0, 1.0], device=device),
        torch.rand(6, device=device),  # all pruned
        torch.tensor([0.0, 7.0], device=device),  # single survivor, zero saliency
    ]
    weights = [
        torch.ones(4, device=device),
        torch.tensor([1.0, 0.0, 1.0], device=device),
        torch.zeros(6, device=device),
        torch.tensor([1.0, 0.0], device=device),
    ]
    # 7 survivors; k = 2/7 -> r = 2 -> tau = 3: every surviving 3 is selected
    got = K.select_global(scores, weights, 2 / 7, backend=backend)
    assert float(got[0].threshold) == 3.0
    assert [g.index.tolist() for g in got] == [[0, 1, 2], [0], [], []]
    assert_same(got, R.select_global(scores, weights, 2 / 7))
    # k = 1: tau = 0, yet zero-saliency survivors are never selected
    got = K.select_global(scores, weights, 1.0, backend=backend)
    assert float(got[0].threshold) == 0.0
    assert [g.index.tolist() for g in got] == [[0, 1, 2], [0, 2], [], []]
    assert [g.n_survivors for g in got] == [4, 2, 0, 1]
    assert_same(got, R.select_global(scores, weights, 1.0))


def test_all_zero_and_all_pruned_select_nothing(backend, device):
    zeros = [torch.zeros(63, device=device), torch.zeros(5, device=device)]
    ones = [torch.ones(63, device=device), torch.ones(5, device=device)]
    assert [g.n_selected for g in K.select_global(zeros, ones, 0.3, backend=backend)] == [0, 0]
    got = K.select_global(ones, zeros, 0.3, backend=backend)  # every weight pruned
    assert all(g.n_selected == 0 and math.isinf(float(g.threshold)) for g in got)


def test_outputs_poisoned_before_the_kernel(backend, device, monkeypatch):
    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(radix, "_empty", poisoned)
    layers = make_layers(device, seed=2)
    s, w = [a for a, _ in layers], [b for _, b in layers]
    assert_same(K.select_global(s, w, 0.3, backend=backend), R.select_global(s, w, 0.3))


def test_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        K.select_global([torch.rand(3)], [], 0.3)
    with pytest.raises(ValueError, match="k must be"):
        K.select_global([torch.rand(3)], [torch.ones(3)], 0.0)
    with pytest.raises(ValueError, match="scores must be >= 0"):
        K.select_global([torch.tensor([-1.0])], [torch.ones(1)], 0.3)
    with pytest.raises(TypeError, match="scores"):
        K.select_global([torch.rand(3).double()], [torch.ones(3)], 0.3)
