"""Radix select over score keys: the threshold search shared by every selection mode.

Keys. Saliency is finite and >= 0, so the float32 bit pattern of a score with the sign bit
cleared (which also maps -0.0 to 0) is a 31-bit integer key that orders exactly like the
scores: s_a < s_b iff key_a < key_b. Key 0 is exactly s == 0, so "key >= 1" is "s > 0".

Search. The key of a threshold is found digit by digit over its 31 bits, most significant
first (`DIGITS`: 7 + 8 + 8 + 8 bits). Each digit costs one histogram pass over the live
keys, those of survivors (weight != 0) whose bits above the digit spell the digits fixed
so far; a histogram bin holds either the number of live keys with that digit (top-k modes)
or the sum of their fixed-point masses q = floor(s * 2**E) (the mass mode). Scanning the
bins from the top, the first bin whose running total reaches the remaining target fixes the
digit. No sort and no size cap. `threshold_keys` runs several independent searches at once
and takes their histograms from a callback, so a caller may sum histograms over layers
(one global threshold) or all-reduce them across ranks (sharded layers) between digits.

Emit. Given a selection key, two passes give G = {i : weight_i != 0, key_i >= key}: per
block counts and float64 partial sums of I_P, I_S, I_G (summed in a fixed order:
deterministic), then an exclusive scan and a write of the sorted flat index.

Zero-saliency rule (docs/method.md): an entry with s_i == 0 is never selected, so a found
threshold key is raised to at least 1 before emitting (`selection_key`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from sau_kernels._common import index_dtype, launch_on_tensor_device, num_selected
from sau_kernels.selection import Selection

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None

# (bits of the digit, shift of the digit) from the most significant digit down; 31 bits.
# 7 + 8 + 8 + 8: on an H200, four passes with 128/256-bin histograms ran 2.5x faster than
# three with 2048/1024 bins (benchmarks/results/gpu-h200-run1: 1.92 ms vs 4.77 ms).
# Read at each call, so a benchmark may swap in another schedule.
DIGITS = ((7, 24), (8, 16), (8, 8), (8, 0))
NO_SELECTION_KEY = 1 << 31  # larger than any 31-bit key: selects nothing

# histograms(searches, prefixes, prefix_shift, bits, shift) -> int64 [len(searches), 2**bits]
Histograms = Callable[[list, list, int, int, int], torch.Tensor]
# A layer of a search: (scores float32 contiguous, weight same numel, backend resolved).
Layer = tuple[torch.Tensor, torch.Tensor, str]


def keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 order-preserving keys, flat: the bits of float32 scores >= 0, sign cleared."""
    return scores.reshape(-1).view(torch.int32) & 0x7FFFFFFF


def key_to_float(key: int) -> float:
    """The float32 value whose bit pattern is the 31-bit `key` (inverse of `keys`)."""
    return float(np.array([key], dtype=np.uint32).view(np.float32)[0])


def fixed_point_exponent(max_score: float, numel: int) -> int:
    """E = 62 - ceil(log2 numel) - e, where max_score < 2**e.

    Then q = floor(s * 2**E) < 2**62 / 2**ceil(log2 numel) for every s <= max_score, so
    the sum of q over numel entries fits in int64. Args: max_score > 0, numel >= 1.
    """
    _, e = math.frexp(max_score)  # max_score < 2**e
    return 62 - (numel - 1).bit_length() - e


def fixed_point(scores: torch.Tensor, exponent: int) -> torch.Tensor:
    """int64 q = floor(scores * 2**exponent), flat, exact (a power-of-two scale in float64)."""
    return torch.floor(scores.reshape(-1).double() * 2.0**exponent).long()


if triton is not None:

    @triton.jit
    def _load_keys(scores_ptr, weight_ptr, offs, n):
        """(inside n, survivor, score, 31-bit key) of each lane of one block of offsets."""
        inside = offs < n
        w = tl.load(weight_ptr + offs, mask=inside, other=0.0)
        s = tl.load(scores_ptr + offs, mask=inside, other=0.0)
        key = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        return inside, w != 0.0, s, key

    @triton.jit
    def _live_digits(
        scores_ptr, weight_ptr, offs, n, prefix, prefix_shift, shift, NUM_BINS: tl.constexpr
    ):
        """(live, digit, key) per lane: live = a survivor whose key >> prefix_shift equals
        prefix; digit = (key >> shift) mod NUM_BINS."""
        inside, survivor, s, key = _load_keys(scores_ptr, weight_ptr, offs, n)
        live = survivor & ((key >> prefix_shift) == prefix)
        return live, (key >> shift) & (NUM_BINS - 1), key

    @triton.jit
    def _fixed_point_bits(key, exponent):
        """int64 floor(s * 2**exponent) from s's 31-bit key, in integers (no float64)."""
        biased = key >> 23
        mant = key & 0x7FFFFF
        # normal: (1.mant) * 2**(biased - 127); subnormal: (0.mant) * 2**-126
        m = tl.where(biased > 0, mant | 0x800000, mant).to(tl.int64)
        sh = tl.where(biased > 0, biased, 1) - 150 + exponent
        left = tl.maximum(sh, 0).to(tl.int64)
        right = tl.minimum(tl.maximum(-sh, 0), 63).to(tl.int64)
        return (m << left) >> right

    @triton.jit
    def _digit_count_kernel(
        scores_ptr,
        weight_ptr,
        hist_ptr,
        n,
        prefix,
        prefix_shift,
        shift,
        iters_per_program,
        NUM_BINS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """hist[d] += number of live keys with digit d (int64 [NUM_BINS])."""
        # Persistent programs: each accumulates a private histogram over many blocks and
        # adds it once (integer atomics: exact and order-independent).
        pid = tl.program_id(0).to(tl.int64)
        n_programs = tl.num_programs(0).to(tl.int64)
        hist = tl.zeros((NUM_BINS,), dtype=tl.int32)
        for it in range(iters_per_program):
            offs = (pid + it * n_programs) * BLOCK + tl.arange(0, BLOCK)
            live, digit, key = _live_digits(
                scores_ptr, weight_ptr, offs, n, prefix, prefix_shift, shift, NUM_BINS
            )
            # Dead lanes are counted into bin 0, then taken out again: this avoids
            # histogram's mask argument, which older Triton releases lack.
            hist += tl.histogram(tl.where(live, digit, 0), NUM_BINS)
            n_dead = tl.sum((~live).to(tl.int32), axis=0)
            hist -= tl.where(tl.arange(0, NUM_BINS) == 0, n_dead, 0)
        tl.atomic_add(hist_ptr + tl.arange(0, NUM_BINS), hist.to(tl.int64))

    @triton.jit
    def _digit_mass_kernel(
        scores_ptr,
        weight_ptr,
        mass_ptr,
        n,
        prefix,
        prefix_shift,
        shift,
        exponent,
        iters_per_program,
        NUM_BINS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """mass[d] += sum of floor(s * 2**exponent) over live keys with digit d (int64)."""
        # Persistent programs; each sums q per bin privately (a one-hot reduction over a
        # [BLOCK, NUM_BINS] tile: no float and no contended atomics), then adds once.
        pid = tl.program_id(0).to(tl.int64)
        n_programs = tl.num_programs(0).to(tl.int64)
        bins = tl.arange(0, NUM_BINS)
        acc = tl.zeros((NUM_BINS,), dtype=tl.int64)
        for it in range(iters_per_program):
            offs = (pid + it * n_programs) * BLOCK + tl.arange(0, BLOCK)
            live, digit, key = _live_digits(
                scores_ptr, weight_ptr, offs, n, prefix, prefix_shift, shift, NUM_BINS
            )
            q = tl.where(live, _fixed_point_bits(key, exponent), 0)
            hit = digit[:, None] == bins[None, :]
            acc += tl.sum(tl.where(hit, q[:, None], 0), axis=0)
        tl.atomic_add(mass_ptr + bins, acc)

    @triton.jit
    def _load_selected(scores_ptr, weight_ptr, offs, n, tau_key):
        """(inside n, survivor, score, selected) per lane: selected = survivor, key >= tau_key."""
        inside, survivor, s, key = _load_keys(scores_ptr, weight_ptr, offs, n)
        return inside, survivor, s, survivor & (key.to(tl.int64) >= tau_key)

    @triton.jit
    def _count_selected_kernel(
        scores_ptr, weight_ptr, counts_ptr, sums_ptr, n, tau_key, BLOCK: tl.constexpr
    ):
        """Per block: counts[b] = |G in b|; sums[b] = float64 (I_P, I_S, I_G) of block b."""
        pid = tl.program_id(0).to(tl.int64)
        # The block's int64 start goes into the pointers and the offsets inside it stay
        # int32: int64 offsets of BLOCK / 128 lanes a thread took 138 registers on sm_120.
        start = pid * BLOCK
        offs = tl.arange(0, BLOCK)
        rest = tl.minimum(n - start, BLOCK).to(tl.int32)
        inside, survivor, s, selected = _load_selected(
            scores_ptr + start, weight_ptr + start, offs, rest, tau_key
        )
        tl.store(counts_ptr + pid, tl.sum(selected.to(tl.int64), axis=0))
        s64 = s.to(tl.float64)
        tl.store(sums_ptr + pid * 3 + 0, tl.sum(tl.where(inside & ~survivor, s64, 0.0), axis=0))
        tl.store(sums_ptr + pid * 3 + 1, tl.sum(tl.where(survivor, s64, 0.0), axis=0))
        tl.store(sums_ptr + pid * 3 + 2, tl.sum(tl.where(selected, s64, 0.0), axis=0))

    @triton.jit
    def _write_selected_kernel(
        scores_ptr, weight_ptr, block_start_ptr, index_ptr, n, tau_key, BLOCK: tl.constexpr
    ):
        """index[block_start[b] + j] = flat offset of the j-th selected entry of block b."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside, survivor, s, selected = _load_selected(scores_ptr, weight_ptr, offs, n, tau_key)
        rank = tl.cumsum(selected.to(tl.int64), axis=0) - 1
        start = tl.load(block_start_ptr + pid)
        tl.store(index_ptr + start + rank, offs.to(index_ptr.dtype.element_ty), mask=selected)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output written in full (tests patch this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _grid_programs(n: int, block: int, device: torch.device) -> int:
    """Persistent-kernel grid: at most 4 programs per SM (4 on the CPU interpreter)."""
    blocks = triton.cdiv(n, block)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(blocks, 4 * sms))
    return max(1, min(blocks, 4))


@launch_on_tensor_device
def _histogram_triton(scores, weight, prefix, prefix_shift, bits, shift, exponent):
    n = scores.numel()
    block = 2048 if exponent is None else 32  # the mass kernel's one-hot tile: BLOCK x bins
    programs = _grid_programs(n, block, scores.device)
    iters = triton.cdiv(triton.cdiv(n, block), programs)
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
    args = (scores, weight, hist, n, prefix, prefix_shift, shift)
    if exponent is None:
        _digit_count_kernel[(programs,)](*args, iters, NUM_BINS=1 << bits, BLOCK=block)
    else:
        _digit_mass_kernel[(programs,)](*args, exponent, iters, NUM_BINS=1 << bits, BLOCK=block)
    return hist


def _histogram_torch(scores, weight, prefix, prefix_shift, bits, shift, exponent):
    key = keys(scores)
    live = (weight.reshape(-1) != 0) & ((key >> prefix_shift) == prefix)
    digit = ((key[live] >> shift) & ((1 << bits) - 1)).long()
    if exponent is None:
        return torch.bincount(digit, minlength=1 << bits)
    mass = torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
    return mass.index_add_(0, digit, fixed_point(scores, exponent)[live])  # exact, any order


def histogram(layer: Layer, prefix: int, prefix_shift: int, bits: int, shift: int, exponent=None):
    """One digit's histogram of a layer's live keys: int64 [2**bits] on its device.

    Live keys: those of survivors whose bits above `prefix_shift` spell `prefix`
    (prefix_shift 31: every survivor). Bin d holds, over the live keys with
    (key >> shift) & (2**bits - 1) == d, their count (exponent None) or the sum of
    floor(s * 2**exponent) (`fixed_point`; the caller keeps every sum below 2**63).
    """
    scores, weight, backend = layer
    if backend == "triton" and scores.numel():
        return _histogram_triton(scores, weight, prefix, prefix_shift, bits, shift, exponent)
    return _histogram_torch(scores, weight, prefix, prefix_shift, bits, shift, exponent)


def layer_histograms(layers: Sequence[Layer], *, exponent=None, device=None) -> Histograms:
    """The `Histograms` callback whose search i is layers[i]: row j is `histogram` of
    layers[searches[j]] at prefixes[j], moved to `device` (None: left where it is)."""

    def histograms(searches, prefixes, prefix_shift, bits, shift):
        rows = [
            histogram(layers[i], p, prefix_shift, bits, shift, exponent)
            for i, p in zip(searches, prefixes)
        ]
        return torch.stack(rows if device is None else [row.to(device) for row in rows])

    return histograms


def find_digit(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """(the bin where the running total from the top first reaches `rank` >= 1, the rank
    left inside that bin: rank minus the total of the bins above it)."""
    from_top = np.cumsum(hist[::-1])
    pos = int(np.searchsorted(from_top, rank))  # first bin (from the top) reaching rank
    above = int(from_top[pos] - hist[::-1][pos])
    return len(hist) - 1 - pos, rank - above


def first_digit_table(histograms: Histograms, n_searches: int) -> np.ndarray:
    """The top digit's table of every search, int64 [n_searches, 2**bits] on the host.

    Nothing is fixed yet, so every survivor is live: with counting histograms row i sums
    to search i's |S|. With n_searches == 0 `histograms` is not called.
    """
    bits, shift = DIGITS[0]
    if n_searches == 0:
        return np.zeros((0, 1 << bits), dtype=np.int64)
    everyone = list(range(n_searches))
    return histograms(everyone, [0] * n_searches, 31, bits, shift).cpu().numpy()


def threshold_keys(histograms: Histograms, first: np.ndarray, targets) -> list[int | None]:
    """Radix select of independent searches, one histogram call per digit for all of them.

    Search i's threshold key is the largest key t such that the weight (count or mass, as
    `histograms` gives it) of its survivors with key >= t reaches targets[i].

    Args:
        histograms: (searches, prefixes, prefix_shift, bits, shift) -> int64 tensor
            [len(searches), 2**bits]: for each listed search, its digit histogram at its
            prefix (see `histogram`). Called once per digit after the first, with the
            searches whose target is > 0; every call of one digit has the same shift.
        first: the searches' top-digit table, as `first_digit_table` gives it.
        targets: per search, the weight to reach, 0 <= target <= the search's total.
    Returns:
        Per search, the 31-bit threshold key, or None where the target is 0.
    """
    n = len(targets)
    prefix, rank = [0] * n, [int(t) for t in targets]
    active = [i for i in range(n) if rank[i] > 0]
    table, prefix_shift = first[active], 31
    for d, (bits, shift) in enumerate(DIGITS):
        if d and active:
            found = [prefix[i] for i in active]
            table = histograms(active, found, prefix_shift, bits, shift).cpu().numpy()
        for row, i in zip(table, active):
            digit, rank[i] = find_digit(row, rank[i])
            prefix[i] = (prefix[i] << bits) | digit
        prefix_shift = shift
    return [prefix[i] if targets[i] > 0 else None for i in range(n)]


def top_k_key(layers: Sequence[Layer], k: float) -> tuple[int | None, list[int]]:
    """The key of the r-th largest survivor score over all `layers` together.

    r = ceil(k * sum_l |S_l|) (`num_selected`); each digit's histogram is one row per
    layer, summed on the host, so no concatenated copy of the scores is made.

    Args:
        layers: (scores, weight, backend) triples on one device; k: fraction in (0, 1].
    Returns:
        (the key, or None when r == 0; [|S_l| per layer]).
    """
    per_layer = layer_histograms(layers)
    everyone = list(range(len(layers)))

    def summed(searches, prefixes, prefix_shift, bits, shift):
        rows = per_layer(everyone, prefixes * len(layers), prefix_shift, bits, shift)
        return rows.cpu().sum(0, keepdim=True)

    first = first_digit_table(per_layer, len(layers))
    n_survivors = [int(x) for x in first.sum(1)]
    r = num_selected(k, sum(n_survivors))
    (key,) = threshold_keys(summed, first.sum(0, keepdims=True), [r])
    return key, n_survivors


def selection_key(tau_key: int | None) -> int:
    """The emit key of a threshold key: at least 1 (zero scores never selected);
    NO_SELECTION_KEY for None."""
    return NO_SELECTION_KEY if tau_key is None else max(tau_key, 1)


def threshold(tau_key: int | None, n_selected: int, device) -> torch.Tensor:
    """0-d float32 tau: the float of tau_key, or +inf when nothing is selected."""
    tau = key_to_float(tau_key) if tau_key is not None and n_selected else float("inf")
    return torch.tensor(tau, dtype=torch.float32, device=device)


@launch_on_tensor_device
def _emit_triton(scores, weight, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = scores.numel()
    block = 4096
    n_blocks = triton.cdiv(n, block)
    counts = _empty(n_blocks, dtype=torch.int64, device=scores.device)
    sums = _empty((n_blocks, 3), dtype=torch.float64, device=scores.device)
    _count_selected_kernel[(n_blocks,)](scores, weight, counts, sums, n, key, BLOCK=block)
    ends = torch.cumsum(counts, 0)
    n_selected = int(ends[-1])
    index = _empty(n_selected, dtype=index_dtype(n), device=scores.device)
    if n_selected:
        _write_selected_kernel[(n_blocks,)](
            scores, weight, ends - counts, index, n, key, BLOCK=block
        )
    return index, sums.sum(0)


def _emit_torch(scores, weight, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = scores.reshape(-1)
    survivors = weight.reshape(-1) != 0
    if key >= NO_SELECTION_KEY:  # 2**31 does not fit an int32 compare: select nothing
        selected = torch.zeros_like(survivors)
    else:
        selected = survivors & (keys(scores) >= key)
    index = torch.nonzero(selected).view(-1).to(index_dtype(s.numel()))
    f64 = torch.float64
    sums = torch.stack(
        [
            torch.where(survivors, 0.0, s).sum(dtype=f64),
            torch.where(survivors, s, 0.0).sum(dtype=f64),
            torch.where(selected, s, 0.0).sum(dtype=f64),
        ]
    )
    return index, sums


def emit(layer: Layer, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G = {i : weight_i != 0 and key_i >= key} of one layer.

    Args:
        layer: (scores, weight, backend); key: an emit key (`selection_key`).
    Returns:
        (index: 1-D sorted flat indices of G, int32 below 2**31 entries else int64;
        float64 [3]: I_P, I_S, I_G, the score sums over pruned entries, survivors and G).
    """
    scores, weight, backend = layer
    if backend == "triton" and scores.numel():
        return _emit_triton(scores, weight, key)
    return _emit_torch(scores, weight, key)


def selection_at_key(layer: Layer, tau_key: int | None, n_survivors: int) -> Selection:
    """The Selection G = {survivors with key >= max(tau_key, 1)} of one layer.

    Args:
        layer: (scores, weight, backend); tau_key: the threshold's key, None: select
            nothing; n_survivors: |S| of the layer (reported as is).
    Returns:
        Selection whose threshold is the float of tau_key (+inf when G is empty).
    """
    index, sums = emit(layer, selection_key(tau_key))
    tau = threshold(tau_key, index.numel(), layer[0].device)
    i_p, i_s, i_g = sums.unbind()
    return Selection(index, tau, n_survivors, index.numel(), i_p, i_s, i_g)
