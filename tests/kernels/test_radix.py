"""radix: keys, the digit schedule, digit histograms, the threshold search and emitting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sau_kernels as K
from sau_kernels import radix
from sau_kernels import reference as R


def make_layer(n=5000, *, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, generator=gen)
    weight[torch.rand(n, generator=gen) < 0.4] = 0
    scores = torch.rand(n, generator=gen) ** 3
    scores[::13] = 0.0
    scores[1::17] = scores[2]  # ties
    return scores.to(device), weight.to(device)


def test_keys_order_like_the_scores_and_round_trip():
    finfo = torch.finfo(torch.float32)
    values = [0.0, 1e-45, 1e-40, finfo.tiny, 1e-30, 0.5, 1.0, 2.0, 3e38, finfo.max]
    scores = torch.tensor(values)
    keys = radix.keys(scores)
    assert keys.dtype == torch.int32
    assert keys.tolist() == sorted(keys.tolist()) and len(set(keys.tolist())) == len(values)
    assert [radix.key_to_float(k) for k in keys.tolist()] == torch.tensor(values).tolist()
    assert radix.keys(torch.tensor([-0.0])).item() == 0  # -0.0 is the key of 0
    assert radix.keys(torch.ones(2, 3)).shape == (6,)


def test_digit_schedule_covers_the_31_key_bits_once():
    covered = 31
    for bits, shift in radix.DIGITS:
        assert bits > 0 and shift + bits == covered
        covered = shift
    assert covered == 0
    assert radix.NO_SELECTION_KEY == 1 << 31


def _live_numpy(scores, weight, prefix, prefix_shift):
    keys = scores.view(torch.int32).numpy().astype(np.int64) & 0x7FFFFFFF
    live = (weight.numpy() != 0) & ((keys >> prefix_shift) == prefix)
    return keys, live


def test_mass_histogram_of_every_digit_matches_numpy(backend, device):
    scores, weight = make_layer(device=device)
    s, w = scores.cpu(), weight.cpu()
    exponent = radix.fixed_point_exponent(float(s.max()), s.numel())
    target = int(radix.keys(s)[100])  # a key whose digits walk a non-empty path
    layer, prefix, prefix_shift = (scores, weight, backend), 0, 31
    for bits, shift in radix.DIGITS:
        got = radix.histogram(layer, prefix, prefix_shift, bits, shift, exponent)
        keys, live = _live_numpy(s, w, prefix, prefix_shift)
        digit = (keys >> shift) & ((1 << bits) - 1)
        # floor(s * 2**E): a power-of-two scale of a double is exact
        weights = np.array([int(v * 2**exponent) for v in s.double().tolist()])
        want = np.zeros(1 << bits, dtype=np.int64)
        np.add.at(want, digit[live], weights[live])  # int64 sums, exact
        assert got.dtype == torch.int64 and got.device.type == device.type
        assert got.cpu().tolist() == [int(x) for x in want]
        prefix, prefix_shift = (prefix << bits) | ((target >> shift) & ((1 << bits) - 1)), shift


def test_histogram_of_an_empty_layer_is_zeros(backend, device):
    empty = torch.zeros(0, device=device)
    hist = radix.histogram((empty, empty, backend), 0, 31, 7, 24, exponent=3)
    assert hist.tolist() == [0] * 128


def test_find_digit_counts_from_the_top():
    hist = np.array([5, 0, 2, 3], dtype=np.int64)
    assert radix.find_digit(hist, 1) == (3, 1)
    assert radix.find_digit(hist, 3) == (3, 3)
    assert radix.find_digit(hist, 4) == (2, 1)
    assert radix.find_digit(hist, 6) == (0, 1)
    assert radix.find_digit(hist, 10) == (0, 5)


def test_threshold_keys_runs_independent_searches_together():
    gen = np.random.default_rng(0)
    # three searches over plain 31-bit keys, many duplicates
    pools = [gen.integers(0, 1 << 31, 500), gen.integers(0, 40, 300) << 20, np.array([7])]
    calls = []

    def histograms(searches, prefixes, prefix_shift, bits, shift):
        calls.append(list(searches))
        rows = []
        for i, p in zip(searches, prefixes):
            k = pools[i][(pools[i] >> prefix_shift) == p]
            rows.append(np.bincount((k >> shift) & ((1 << bits) - 1), minlength=1 << bits))
        return torch.tensor(np.stack(rows))

    first = radix.first_digit_table(histograms, 3)
    assert first.sum(1).tolist() == [500, 300, 1]
    targets = [37, 0, 1]
    got = radix.threshold_keys(histograms, first, targets)
    assert got[0] == int(np.sort(pools[0])[::-1][36]) and got[1] is None and got[2] == 7
    # one call per later digit, for the searches with a target only
    assert calls == [[0, 1, 2]] + [[0, 2]] * (len(radix.DIGITS) - 1)


def test_first_digit_table_of_no_search_calls_nothing():
    def histograms(*args):
        raise AssertionError("called")

    assert radix.first_digit_table(histograms, 0).shape == (0, 1 << radix.DIGITS[0][0])
    assert radix.threshold_keys(histograms, radix.first_digit_table(histograms, 0), []) == []


def test_emit_is_the_survivors_at_or_above_the_key(backend, device):
    scores, weight = make_layer(device=device)
    layer = (scores, weight, backend)
    keys, survivors = radix.keys(scores).cpu(), weight.cpu() != 0
    s64 = scores.cpu().double()
    for key in (1, int(keys.median()), int(keys.max()), radix.NO_SELECTION_KEY):
        index, sums = radix.emit(layer, key)
        selected = survivors & (keys.long() >= key)
        assert index.dtype == torch.int32
        assert torch.equal(index.cpu(), torch.nonzero(selected).view(-1).int())
        want = torch.stack([s64[~survivors].sum(), s64[survivors].sum(), s64[selected].sum()])
        torch.testing.assert_close(sums.cpu(), want, atol=1e-12, rtol=1e-12)


def test_threshold_and_selection_key():
    assert radix.selection_key(None) == radix.NO_SELECTION_KEY
    assert radix.selection_key(0) == 1 and radix.selection_key(5) == 5
    one = int(radix.keys(torch.tensor([1.0])))
    assert float(radix.threshold(one, 3, "cpu")) == 1.0
    assert float(radix.threshold(one, 0, "cpu")) == float("inf")
    assert float(radix.threshold(None, 3, "cpu")) == float("inf")


def test_fixed_point_fits_int64():
    # the largest score maps into [2**61, 2**62) / 2**ceil(log2 n): n of them fit int64
    for value, n in ((3.4e38, 1), (1e-45, 2**31), (1.0, 4097), (0.75, 1 << 20)):
        score = torch.tensor([value])  # float32, as scores are
        q = int(radix.fixed_point(score, radix.fixed_point_exponent(float(score), n)))
        room = 2 ** (n - 1).bit_length()
        assert 2**61 // room <= q < 2**62 // room


def _scores_case(case: str, shape, *, seed=0, device="cpu"):
    """(scores, weight) of a half-pruned layer: random, tied (four distinct values, zero
    among them) or all-equal scores."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    weight[torch.rand(shape, generator=gen) < 0.5] = 0
    scores = torch.rand(shape, generator=gen)
    if case == "tied":
        scores = torch.floor(scores * 4) / 4
    elif case == "all_equal":
        scores = torch.full_like(scores, 0.375)
    return scores.to(device), weight.to(device)


def _assert_reference(got, want):
    assert torch.equal(got.index.cpu(), want.index.cpu())
    assert torch.equal(got.threshold.cpu(), want.threshold.cpu())
    assert (got.n_survivors, got.n_selected) == (want.n_survivors, want.n_selected)
    for f in ("importance_pruned", "importance_survivors", "importance_selected"):
        a, b = getattr(got, f).cpu(), getattr(want, f).cpu()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("k", [0.1, 0.3])
@pytest.mark.parametrize("case", ["random", "tied", "all_equal"])
def test_selection_reads_at_most_2_5_numel_per_layer(backend, device, case, k):
    """Elements read per layer, counted at the launchers (`radix.count_reads`).

    Convention: every pass adds the input elements its launch reads: a full pass over a
    layer adds its numel (scores and weight are read side by side: one element per
    position), a pass over candidates their number, the write pass its bit words (32
    positions a word) and its per-block entries. Per-layer top-k (select_topk's Triton
    path; its PyTorch path is a kthvalue, not these passes) and a global selection over
    three layers, whose passes run on both backends.
    """
    layers = [_scores_case(case, (37, 111), seed=i, device=device) for i in range(3)]
    checks = [(layers, K.select_global, R.select_global)]
    if backend == "triton":
        checks.append(([layers[0]], _topk_as_list, _reference_topk_as_list))
    for group, fast, slow in checks:
        scores, weights = [s for s, _ in group], [w for _, w in group]
        with radix.count_reads() as reads:
            got = fast(scores, weights, k, backend=backend)
        for a, b in zip(got, slow(scores, weights, k)):
            _assert_reference(a, b)
        for s in scores:
            assert 2 * s.numel() <= reads.elements[s.data_ptr()] <= 2.5 * s.numel()
    assert radix._COUNTERS == []  # nothing left counting after the block


def _topk_as_list(scores, weights, k, *, backend):
    return [K.select_topk(scores[0], weights[0], k, backend=backend)]


def _reference_topk_as_list(scores, weights, k):
    return [R.select_topk(scores[0], weights[0], k)]


@pytest.mark.parametrize("fraction", [1, 10**12])  # candidates always / never fit
@pytest.mark.parametrize("case", ["random", "tied", "all_equal", "skewed"])
def test_candidate_and_full_pass_paths_match_the_reference(
    backend, device, monkeypatch, fraction, case
):
    # Never fitting forces full split passes for every digit; always fitting, the
    # candidate passes. "skewed" packs most scores into one first-digit bucket.
    monkeypatch.setattr(radix, "CANDIDATE_FRACTION", fraction)
    scores, weight = _scores_case("random" if case == "skewed" else case, 3001, device=device)
    if case == "skewed":
        scores = 1.0 + scores * 2**-10  # [1, 1 + 2**-10): one top-11-bit bucket
        scores[::7] = 0.0
    for k in (1.0, 0.5, 0.3, 0.1, 1e-6):
        (got,) = radix.top_k([(scores, weight, backend)], k)
        _assert_reference(got, R.select_topk(scores, weight, k))


def test_read_count_shows_the_passes(backend, device, monkeypatch):
    scores, weight = _scores_case("random", 4097, device=device)
    layer = (scores, weight, backend)
    n = scores.numel()
    with radix.count_reads() as reads:
        radix.top_k([layer], 0.3)
    # first pass, split (candidates written), candidate select, write: 4 passes, syncs
    # after the first pass, the split and before the write
    assert reads.launches == 4 and reads.syncs == 3
    monkeypatch.setattr(radix, "CANDIDATE_FRACTION", 10**12)
    with radix.count_reads() as reads:
        radix.top_k([layer], 0.3)
    assert reads.elements[scores.data_ptr()] > 3 * n  # without candidates: full passes


def test_searches_with_fixed_rounds_reduce_four_times(backend, device):
    layers = [_scores_case(c, 999, seed=3, device=device) for c in ("random", "all_equal")]
    calls = []

    def reduce(table):
        calls.append(table.shape)
        return table

    def targets(n_survivors):
        return [math.ceil(0.3 * n) for n in n_survivors]

    taus, n_survivors, emitted = radix.select_searches(
        [(s, w, backend) for s, w in layers], [[0], [1]], targets,
        reduce=reduce, fixed_rounds=True,
    )  # fmt: skip
    assert len(calls) == 4 and all(shape[0] == 2 for shape in calls)
    for (s, w), tau, (index, _) in zip(layers, taus, emitted):
        want = R.select_topk(s, w, 0.3)
        assert torch.equal(index.cpu(), want.index.cpu())
        assert radix.key_to_float(tau) == float(want.threshold)


def test_combine_ranks_sums_histograms_and_merges_key_ranges():
    width = radix.NUM_BINS + 6
    a = torch.zeros(1, width, dtype=torch.int64)
    b = torch.zeros(1, width, dtype=torch.int64)
    a[0, 3], b[0, 3], a[0, -4], b[0, -4] = 2, 5, 10, 7
    a[0, -3:] = torch.tensor([40, 90, 60])
    b[0, -3:] = torch.tensor([20, 80, radix.KEY_NONE])
    got = radix.combine_ranks(torch.stack([a, b]))
    assert got.shape == (1, width) and int(got[0, 3]) == 7 and int(got[0, -4]) == 17
    assert got[0, -3:].tolist() == [20, 90, 60]


def test_global_selection_syncs_per_pass_not_per_layer(backend, device):
    layers = [_scores_case("random", 999, seed=4, device=device)] * 6
    syncs = []
    for n_layers in (1, 6):
        scores, weights = [s for s, _ in layers[:n_layers]], [w for _, w in layers[:n_layers]]
        with radix.count_reads() as reads:
            got = K.select_global(scores, weights, 0.3, backend=backend)
        syncs.append(reads.syncs)
        for a, b in zip(got, R.select_global(scores, weights, 0.3)):
            _assert_reference(a, b)
    assert syncs[0] == syncs[1] <= 4
