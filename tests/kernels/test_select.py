"""select_topk against the sort-based reference: exact index, threshold and counts."""

from __future__ import annotations

import math

import pytest
import torch

import sau_kernels as K
from sau_kernels import radix, select
from sau_kernels import reference as R
from sau_kernels._common import num_selected

SHAPES = [(0,), (1,), (63,), (4097,), (37, 45)]
KS = [1.0, 0.3, 1e-6]


def make_layer(shape, *, sparsity=0.5, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    weight[torch.rand(shape, generator=gen) < sparsity] = 0
    scores = torch.rand(shape, generator=gen) ** 3  # skewed, like saliency
    return scores.to(device), weight.to(dtype).to(device)


def assert_same_selection(got, want):
    assert got.index.dtype == want.index.dtype
    assert torch.equal(got.index.cpu(), want.index.cpu())
    assert got.threshold.dtype == torch.float32 and got.threshold.dim() == 0
    # bitwise: tau is one of the scores, never an approximation
    assert torch.equal(got.threshold.cpu(), want.threshold.cpu())
    assert (got.n_survivors, got.n_selected) == (want.n_survivors, want.n_selected)
    for field in ("importance_pruned", "importance_survivors", "importance_selected"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == torch.float64 and a.dim() == 0
        # float64 sums in a different order: agree to float64 rounding
        torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(backend, device, shape, k, dtype):
    scores, weight = make_layer(shape, dtype=dtype, device=device)
    got = K.select_topk(scores, weight, k, backend=backend)
    assert_same_selection(got, R.select_topk(scores, weight, k))


@pytest.mark.parametrize("k", KS)
def test_definition_from_first_principles(backend, device, k):
    scores, weight = make_layer((4097,), seed=3, device=device)
    sel = K.select_topk(scores, weight, k, backend=backend)
    s, surv = scores.cpu().double(), weight.cpu() != 0
    r = math.ceil(k * int(surv.sum()) - 1e-9)
    tau = float(sel.threshold)
    # tau is the r-th largest survivor score: fewer than r above it, at least r at/above it
    assert int((s[surv] > tau).sum()) < r <= int((s[surv] >= tau).sum())
    chosen = torch.zeros_like(surv)
    chosen[sel.index.long().cpu()] = True
    assert not (chosen & ~surv).any(), "a pruned weight was selected"
    assert torch.equal(chosen, surv & (s >= tau) & (s > 0))
    assert float(sel.importance_selected) == pytest.approx(float(s[chosen].sum()), rel=1e-12)


def test_ties_at_threshold_all_selected(backend, device):
    scores = torch.tensor([5.0, 3.0, 3.0, 3.0, 3.0, 1.0, 0.0, 3.0], device=device)
    weight = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0], device=device)
    sel = K.select_topk(scores, weight, 2 / 7, backend=backend)  # r = 2 -> tau = 3
    assert float(sel.threshold) == 3.0
    assert sel.index.tolist() == [0, 1, 2, 3, 4]  # index 7 ties too but is pruned
    assert_same_selection(sel, R.select_topk(scores, weight, 2 / 7))


def test_all_pruned(backend, device):
    scores, _ = make_layer((63,), device=device)
    weight = torch.zeros(63, device=device)
    sel = K.select_topk(scores, weight, 0.3, backend=backend)
    assert sel.n_survivors == 0 and sel.n_selected == 0 and sel.index.numel() == 0
    assert math.isinf(float(sel.threshold))
    assert float(sel.importance_selected) == 0.0 == float(sel.importance_survivors)
    assert float(sel.importance_pruned) == pytest.approx(float(scores.double().sum()), rel=1e-12)


def test_nothing_pruned_has_exactly_zero_pruned_importance(backend, device):
    scores, _ = make_layer((4097,), device=device)
    weight = torch.ones(4097, device=device)
    sel = K.select_topk(scores, weight, 0.3, backend=backend)
    assert float(sel.importance_pruned) == 0.0
    assert sel.n_survivors == 4097
    assert_same_selection(sel, R.select_topk(scores, weight, 0.3))


@pytest.mark.parametrize("k", [0.3, 1.0])
def test_all_zero_saliency_selects_nothing(backend, device, k):
    # No forget gradient anywhere (a never-routed expert): nothing to unlearn there.
    _, weight = make_layer((4097,), device=device)
    scores = torch.zeros(4097, device=device)
    scores[::7] = -0.0  # -0.0 is zero saliency too
    sel = K.select_topk(scores, weight, k, backend=backend)
    assert sel.n_selected == 0 and sel.index.numel() == 0
    assert sel.n_survivors == int((weight != 0).sum()) > 0
    assert math.isinf(float(sel.threshold))
    assert float(sel.importance_selected) == 0.0
    assert_same_selection(sel, R.select_topk(scores, weight, k))


def test_fewer_nonzero_survivors_than_r(backend, device):
    # r = ceil(0.5 * 6) = 3 but only two survivors have saliency: G holds those two.
    scores = torch.tensor([0.0, 2.0, 0.0, 0.0, 1e-45, 0.0, 9.0, 0.0], device=device)
    weight = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0], device=device)
    sel = K.select_topk(scores, weight, 0.5, backend=backend)
    assert sel.index.tolist() == [1, 4]  # index 6 has saliency but is pruned
    assert sel.n_selected == 2 < num_selected(0.5, sel.n_survivors) == 3
    assert float(sel.threshold) == 0.0  # tau is still the r-th largest survivor score
    assert_same_selection(sel, R.select_topk(scores, weight, 0.5))


@pytest.mark.parametrize("k", KS)
def test_mostly_zero_saliency_matches_reference(backend, device, k):
    # Dead units: whole rows of zero saliency around a few live ones.
    scores, weight = make_layer((37, 111), seed=7, device=device)
    scores[torch.arange(37, device=device) % 3 != 0] = 0.0
    got = K.select_topk(scores, weight, k, backend=backend)
    want = R.select_topk(scores, weight, k)
    assert_same_selection(got, want)
    assert bool((scores.view(-1)[got.index.long()] > 0).all())


def test_k_one_selects_all_survivors_and_tiny_k_one(backend, device):
    scores, weight = make_layer((4097,), device=device)
    assert K.select_topk(scores, weight, 1.0, backend=backend).n_selected == int(
        (weight != 0).sum()
    )
    tiny = K.select_topk(scores, weight, 1e-9, backend=backend)
    assert tiny.n_selected == 1
    assert float(tiny.threshold) == float(scores[weight != 0].max())


def test_negative_zero_subnormal_and_huge_scores_order(backend, device):
    scores = torch.tensor([-0.0, 1e-45, 1e-40, 3e38, 2.0, 0.0], device=device)
    weight = torch.ones(6, device=device)
    for k in (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0):
        assert_same_selection(
            K.select_topk(scores, weight, k, backend=backend), R.select_topk(scores, weight, k)
        )


def test_num_selected_is_exact_ceil():
    assert num_selected(0.3, 10) == 3  # float 0.3 * 10 is 3.0000000000000004
    assert num_selected(0.7, 10) == 7
    assert num_selected(1.0, 5) == 5 and num_selected(1e-9, 5) == 1 and num_selected(0.5, 0) == 0


def test_outputs_poisoned_before_the_kernel(backend, device, monkeypatch):
    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(radix, "_empty", poisoned)
    scores, weight = make_layer((4097,), device=device)
    assert_same_selection(
        K.select_topk(scores, weight, 0.3, backend=backend), R.select_topk(scores, weight, 0.3)
    )


def test_many_blocks_and_programs(backend, device):
    # more blocks than histogram programs: exercises the persistent loop and the scan
    scores, weight = make_layer((123_457,), seed=5, device=device)
    assert_same_selection(
        K.select_topk(scores, weight, 0.3, backend=backend), R.select_topk(scores, weight, 0.3)
    )


def test_no_size_cap_on_torch_path():
    n = 40_000_000  # torch.quantile refuses inputs over 16.7M elements
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(n, generator=gen)
    weight = torch.ones(n)
    weight[::2] = 0
    with pytest.raises(RuntimeError):
        torch.quantile(scores[1::2], 0.7)
    sel = K.select_topk(scores, weight, 0.3, backend="torch")
    r = num_selected(0.3, n // 2)
    survivors = scores[1::2]
    tau = sel.threshold
    assert int((survivors > tau).sum()) < r <= int((survivors >= tau).sum())
    assert sel.n_selected == int((survivors >= tau).sum())
    assert bool((sel.index % 2 == 1).all())


@pytest.mark.parametrize(
    "scores, weight, k, exc, match",
    [
        (torch.rand(4), torch.ones(4), 0.0, ValueError, "k must be"),
        (torch.rand(4), torch.ones(4), 1.5, ValueError, "k must be"),
        (torch.rand(4), torch.ones(4), -0.1, ValueError, "k must be"),
        (torch.rand(4), torch.ones(4), True, ValueError, "k must be"),
        (
            torch.tensor([1.0, float("nan")]),
            torch.ones(2),
            0.5,
            ValueError,
            "scores must be finite",
        ),
        (
            torch.tensor([1.0, float("inf")]),
            torch.ones(2),
            0.5,
            ValueError,
            "scores must be finite",
        ),
        (torch.tensor([1.0, -1.0]), torch.ones(2), 0.5, ValueError, "scores must be >= 0"),
        (torch.rand(4).double(), torch.ones(4), 0.5, TypeError, "scores"),
        (torch.rand(4), torch.ones(4, dtype=torch.int8), 0.5, TypeError, "weight"),
        (torch.rand(4), torch.ones(4, dtype=torch.complex64), 0.5, TypeError, "weight"),
        (torch.rand(4), torch.ones(5), 0.5, ValueError, "scores and weight"),
        (torch.rand(4), torch.ones(4, device="meta"), 0.5, ValueError, "device"),
    ],
)
def test_bad_input(scores, weight, k, exc, match):
    with pytest.raises(exc, match=match):
        K.select_topk(scores, weight, k)


def _case_layer(shape, case, dtype):
    """A layer for the CPU-path comparison: make_layer's, with the named twist."""
    scores, weight = make_layer(shape, seed=11)
    if case == "ties":
        scores = torch.floor(scores * 4)  # four values, zero among them
    elif case == "mostly_zero":
        scores[torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.8] = 0.0
    elif case == "all_zero":
        scores = torch.zeros(shape)
    elif case == "nothing_pruned":
        weight = torch.ones(shape)
    elif case == "all_pruned":
        weight = torch.zeros(shape)
    return scores, weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [*KS, 0.5])
@pytest.mark.parametrize(
    "case", ["skewed", "ties", "mostly_zero", "all_zero", "nothing_pruned", "all_pruned"]
)
@pytest.mark.parametrize("shape", [*SHAPES, (100_003,)])
def test_cpu_path_equals_torch_path_bit_for_bit(shape, case, k, dtype):
    # CPU tensors take the numpy path; it must give the torch path's Selection exactly,
    # the float64 importances included (same values summed in the same order).
    scores, weight = _case_layer(shape, case, dtype)
    got = select._select_cpu(scores, weight, k)
    want = select._select_torch(scores, weight, k)
    assert got.index.dtype == want.index.dtype and torch.equal(got.index, want.index)
    assert got.threshold.dtype == torch.float32 and got.threshold.dim() == 0
    assert torch.equal(got.threshold, want.threshold)
    assert (got.n_survivors, got.n_selected) == (want.n_survivors, want.n_selected)
    for field in ("importance_pruned", "importance_survivors", "importance_selected"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == torch.float64 and a.dim() == 0
        assert float(a).hex() == float(b).hex(), field


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_path_signed_zeros(dtype):
    # -0.0 weights are pruned; a zero tau is reported as +0.0 whichever zero ranks r-th.
    weight = torch.tensor([-0.0, 1.0, 0.0, 2.0, -3.0, 4.0]).to(dtype)
    scores = torch.tensor([1.0, -0.0, 2.0, 0.0, 5.0, 0.0])
    for k in (1.0, 0.75, 0.5, 0.25):
        got = select._select_cpu(scores, weight, k)
        assert_same_selection(got, R.select_topk(scores, weight, k))
        if float(got.threshold) == 0:
            assert math.copysign(1.0, float(got.threshold)) == 1.0


def test_cpu_path_takes_parameters_that_require_grad():
    scores, weight = make_layer((37, 45))
    sel = K.select_topk(scores.requires_grad_(), torch.nn.Parameter(weight), 0.3)
    assert_same_selection(sel, R.select_topk(scores.detach(), weight, 0.3))
