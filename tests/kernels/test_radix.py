"""radix: keys, the digit schedule, digit histograms, the threshold search and emitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sau_kernels import radix


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


@pytest.mark.parametrize("mass", [False, True])
def test_histogram_of_every_digit_matches_numpy(backend, device, mass):
    scores, weight = make_layer(device=device)
    s, w = scores.cpu(), weight.cpu()
    exponent = radix.fixed_point_exponent(float(s.max()), s.numel()) if mass else None
    target = int(radix.keys(s)[100])  # a key whose digits walk a non-empty path
    layer, prefix, prefix_shift = (scores, weight, backend), 0, 31
    for bits, shift in radix.DIGITS:
        got = radix.histogram(layer, prefix, prefix_shift, bits, shift, exponent)
        keys, live = _live_numpy(s, w, prefix, prefix_shift)
        digit = (keys >> shift) & ((1 << bits) - 1)
        weights = np.ones(s.numel(), dtype=np.int64)
        if mass:  # floor(s * 2**E): a power-of-two scale of a double is exact
            weights = np.array([int(v * 2**exponent) for v in s.double().tolist()])
        want = np.zeros(1 << bits, dtype=np.int64)
        np.add.at(want, digit[live], weights[live])  # int64 sums, exact
        assert got.dtype == torch.int64 and got.device.type == device.type
        assert got.cpu().tolist() == [int(x) for x in want]
        prefix, prefix_shift = (prefix << bits) | ((target >> shift) & ((1 << bits) - 1)), shift


def test_histogram_of_an_empty_layer_is_zeros(backend, device):
    empty = torch.zeros(0, device=device)
    hist = radix.histogram((empty, empty, backend), 0, 31, 7, 24)
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
