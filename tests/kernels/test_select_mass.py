"""select_mass: the smallest top set of survivors holding a share of their saliency."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import sau_kernels as K
from sau_kernels import radix
from sau_kernels import reference as R

SHARES = [1.0, 0.8, 0.5, 1e-6]


def make_layer(shape, *, sparsity=0.5, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    weight[torch.rand(shape, generator=gen) < sparsity] = 0
    scores = torch.rand(shape, generator=gen) ** 3
    return scores.to(device), weight.to(dtype).to(device)


def assert_same_selection(got, want):
    assert got.index.dtype == want.index.dtype
    assert torch.equal(got.index.cpu(), want.index.cpu())
    assert torch.equal(got.threshold.cpu(), want.threshold.cpu())  # bitwise
    assert (got.n_survivors, got.n_selected) == (want.n_survivors, want.n_selected)
    for f in ("importance_pruned", "importance_survivors", "importance_selected"):
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == torch.float64 and a.dim() == 0
        torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-12, rtol=1e-12)


def assert_smallest_prefix(sel, scores, weight, share):
    """The definition from first principles, in Python integers."""
    s = scores.reshape(-1).cpu()
    surv = weight.reshape(-1).cpu() != 0
    q = radix.fixed_point(s, radix.fixed_point_exponent(float(s.max()), s.numel()))
    total = int(q[surv].sum())
    target = math.ceil(Fraction(share) * total)
    tau = sel.threshold.cpu()
    above = int(q[surv & (s > tau)].sum())
    at_or_above = int(q[surv & (s >= tau)].sum())
    assert above < target <= at_or_above  # a smaller prefix would miss the share
    chosen = torch.zeros_like(surv)
    chosen[sel.index.long().cpu()] = True
    assert torch.equal(chosen, surv & (s >= tau) & (s > 0))


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize(
    "shape, dtype",
    [((1,), torch.float32), ((63,), torch.float32), ((4097,), torch.float32)]
    + [((37, 45), torch.float32), ((37, 45), torch.bfloat16)],
)
def test_matches_sort_reference(backend, device, shape, share, dtype):
    scores, weight = make_layer(shape, dtype=dtype, device=device)
    got = K.select_mass(scores, weight, share, backend=backend)
    assert_same_selection(got, R.select_mass(scores, weight, share))
    if got.n_survivors:
        assert_smallest_prefix(got, scores, weight, share)


def test_ties_at_the_boundary_are_all_selected(backend, device):
    # survivor mass 5 + 4 * 3 + 1 = 18; share 0.5 -> target 9: 5 + 3 + 3 reaches it, so
    # tau = 3 and every surviving 3 (four of them) is selected: 17 of 18 held.
    scores = torch.tensor([5.0, 3.0, 3.0, 3.0, 3.0, 1.0, 0.0, 3.0], device=device)
    weight = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0], device=device)
    sel = K.select_mass(scores, weight, 0.5, backend=backend)
    assert float(sel.threshold) == 3.0
    assert sel.index.tolist() == [0, 1, 2, 3, 4]
    assert_same_selection(sel, R.select_mass(scores, weight, 0.5))
    # share 0.25 (target 4.5) is reached by the 5 alone
    sel = K.select_mass(scores, weight, 0.25, backend=backend)
    assert sel.index.tolist() == [0]
    # share 1: every survivor with mass, never the zero
    sel = K.select_mass(scores, weight, 1.0, backend=backend)
    assert sel.index.tolist() == [0, 1, 2, 3, 4, 5] and float(sel.threshold) == 1.0


def test_all_zero_all_pruned_single_survivor_and_empty(backend, device):
    ones = torch.ones(63, device=device)
    sel = K.select_mass(torch.zeros(63, device=device), ones, 0.8, backend=backend)
    assert sel.n_selected == 0 and math.isinf(float(sel.threshold)) and sel.n_survivors == 63
    sel = K.select_mass(torch.rand(63, device=device), torch.zeros(63, device=device), 0.8)
    assert sel.n_selected == 0 and sel.n_survivors == 0
    weight = torch.zeros(63, device=device)
    weight[17] = 2.0
    scores = torch.rand(63, device=device) + 0.1
    sel = K.select_mass(scores, weight, 1e-6, backend=backend)
    assert sel.index.tolist() == [17] and torch.equal(sel.threshold, scores[17])
    empty = torch.zeros(0, device=device)
    assert K.select_mass(empty, empty, 0.5, backend=backend).n_selected == 0


def test_subnormal_and_huge_scores(backend, device):
    # The Triton path reads q from the float bits; the reference multiplies in float64.
    scores = torch.tensor([1e-45, 1e-40, 3e38, 2.0, 0.0, 1e-30, 5e37], device=device)
    weight = torch.ones(7, device=device)
    for share in (0.1, 0.9, 0.999999, 1.0):
        assert_same_selection(
            K.select_mass(scores, weight, share, backend=backend),
            R.select_mass(scores, weight, share),
        )
    tiny = torch.tensor([1e-45, 3e-45, 1e-44, 0.0], device=device)
    for share in (0.3, 0.7, 1.0):
        assert_same_selection(
            K.select_mass(tiny, weight[:4], share, backend=backend),
            R.select_mass(tiny, weight[:4], share),
        )


def test_many_blocks_and_programs_and_poisoned_outputs(backend, device, monkeypatch):
    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(radix, "_empty", poisoned)
    scores, weight = make_layer((20_011,), seed=5, device=device)
    sel = K.select_mass(scores, weight, 0.8, backend=backend)
    assert_same_selection(sel, R.select_mass(scores, weight, 0.8))
    assert_smallest_prefix(sel, scores, weight, 0.8)


@pytest.mark.parametrize("share", [0.0, 1.5, -0.1, True, "0.5"])
def test_bad_share(share):
    with pytest.raises(ValueError, match="share must be"):
        K.select_mass(torch.rand(4), torch.ones(4), share)


def test_bad_scores():
    with pytest.raises(ValueError, match="finite"):
        K.select_mass(torch.tensor([1.0, float("nan")]), torch.ones(2), 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        K.select_mass(torch.tensor([1.0, -1.0]), torch.ones(2), 0.5)
