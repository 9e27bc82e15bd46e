"""Radix select over score keys: the threshold search shared by every selection mode.

Keys. Saliency is finite and >= 0, so the float32 bit pattern of a score with the sign bit
cleared (which also maps -0.0 to 0) is a 31-bit integer key that orders exactly like the
scores: s_a < s_b iff key_a < key_b. Key 0 is exactly s == 0, so "key >= 1" is "s > 0".

Counting selection (top-k per layer, global, sharded: `select_searches`), in the manner
of AIR top-k (RAFT/cuVS) and CUB's DeviceTopK; each step is one kernel launch per layer
and one host sync for all layers:

1. First pass (reads scores and weight): the histogram of the top 11 key bits of the
   survivors (weight != 0) and their min and max key. The bin where the running count
   from the top reaches r is the window [lo, hi] that holds tau, narrowed to the key range.
2. Split pass (reads them again): per block of SPLIT_BLOCK positions, the bits of the
   entries above the window (selected for sure) and of the window's entries, their counts
   and float64 partial sums of I_P, I_S, I_G; the window's next 11-bit digit histogram
   and key range; and, when the window holds at most numel / CANDIDATE_FRACTION entries,
   their (key, position) as candidates, each block's contiguous and in position order.
3. Later digits read the candidates only (a full split again when they did not fit).
   Three digits cover the 31 bits (11 + 11 + 9), and the key range read with every
   histogram narrows the window further.
4. Early stop: once the window's count equals the rank still needed, or lo == hi, the
   whole window is selected and tau is its smallest key; an all-equal layer is done after
   the first pass, a layer of a few distinct values after the split.
5. Emit: the selected candidates' bits are OR-ed into their block's words (or the window's
   bits taken whole); an exclusive scan of per-block counts and a write from the bit words
   give the sorted index. Reads: about 2 x numel plus the candidates and numel / 32 words.

Mass mode (`threshold_keys`, `histogram`): digit passes of 7 + 8 + 8 + 8 bits whose bins
sum fixed-point masses q = floor(s * 2**E) instead of counting, then `emit`.

Zero-saliency rule (docs/method.md): an entry with s_i == 0 is never selected, so a found
threshold key is raised to at least 1 before emitting (`selection_key`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sau_kernels._common import index_dtype, launch_on_tensor_device, num_selected
from sau_kernels.selection import Selection

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None

# Mass mode: (bits of the digit, shift of the digit) from the most significant digit
# down; 31 bits. Read at each call, so a benchmark may swap in another schedule.
DIGITS = ((7, 24), (8, 16), (8, 8), (8, 0))
NO_SELECTION_KEY = 1 << 31  # larger than any 31-bit key: selects nothing
KEY_NONE = (1 << 31) - 1  # "no key" in min reductions; no finite score has it (a NaN)

# Counting selection. Digits of 11 bits (2048 bins): Triton 3.9 lowers tl.histogram to one
# shared-memory atomic per element (checked in its PTX), so a wide digit costs no more
# per element than a narrow one, and 11 + 11 + 9 bits need three histograms.
DIGIT_BITS = 11
NUM_BINS = 1 << DIGIT_BITS
FIRST_SHIFT = 31 - DIGIT_BITS
FIRST_BLOCK = 2048  # entries a program reads per step of the first and candidate passes
SPLIT_BLOCK = 1024  # positions per block of the split pass: 32 bit words of each kind
# Candidates when the window holds <= numel / 8 entries. A candidate costs 8 bytes written
# once and read about three times (a histogram, the select, maybe one more histogram),
# ~32 bytes, while a full pass reads 6-8 bytes per entry; at 1/8 the candidate path costs
# at most ~4 bytes per entry, half a full pass, and its buffer at most 1 byte per entry.
CANDIDATE_FRACTION = 8

# histograms(searches, prefixes, prefix_shift, bits, shift) -> int64 [len(searches), 2**bits]
Histograms = Callable[[list, list, int, int, int], torch.Tensor]
# A layer of a search: (scores float32 contiguous, weight same numel, backend resolved).
Layer = tuple[torch.Tensor, torch.Tensor, str]


@dataclass
class ReadCount:
    """What the selection passes read while `count_reads` is active.

    elements: per scores tensor (keyed by its data_ptr()), the elements its launches read:
        a full pass adds numel (scores and weight are read together: one element per
        position), a candidate pass its candidates, a write pass its bit words (32
        positions a word) and per-block entries.
    launches: passes counted; syncs: host syncs of the search and emit.
    """

    elements: dict[int, int] = field(default_factory=dict)
    launches: int = 0
    syncs: int = 0


_COUNTERS: list[ReadCount] = []


@contextlib.contextmanager
def count_reads() -> Iterator[ReadCount]:
    """Count the elements the selection passes read inside the block (both backends).

    Yields a fresh ReadCount, filled until the block exits; nothing is kept after it.
    """
    counter = ReadCount()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count_read(scores: torch.Tensor, elements: int) -> None:
    for counter in _COUNTERS:
        key = scores.data_ptr()
        counter.elements[key] = counter.elements.get(key, 0) + int(elements)
        counter.launches += 1


def _count_sync() -> None:
    for counter in _COUNTERS:
        counter.syncs += 1


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
    def _first_pass_kernel(
        scores_ptr,
        weight_ptr,
        hist_ptr,
        range_ptr,
        bad_ptr,
        n,
        shift,
        iters_per_program,
        NUM_BINS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """hist[d] += survivors with key >> shift == d; range = (min, max) survivor key;
        bad = (NaN or inf scores, negative scores), over every entry."""
        # Persistent programs: a private histogram and key range over many blocks, added
        # once (integer atomics: exact and order-independent).
        pid = tl.program_id(0).to(tl.int64)
        n_programs = tl.num_programs(0).to(tl.int64)
        bins = tl.arange(0, NUM_BINS)
        hist = tl.zeros((NUM_BINS,), dtype=tl.int32)
        lo = tl.zeros((), dtype=tl.int32) + 2147483647
        hi = tl.zeros((), dtype=tl.int32) - 1
        nonfinite = tl.zeros((), dtype=tl.int64)
        negative = tl.zeros((), dtype=tl.int64)
        for it in range(iters_per_program):
            offs = (pid + it * n_programs) * BLOCK + tl.arange(0, BLOCK)
            inside, survivor, s, key = _load_keys(scores_ptr, weight_ptr, offs, n)
            # The input check rides on this read: exponent all ones is NaN or inf; a set
            # sign bit on a non-zero finite value is a negative score (-0.0 is zero).
            bad = inside & (key >= 0x7F800000)
            minus = inside & (s.to(tl.int32, bitcast=True) < 0) & (key != 0) & ~bad
            nonfinite += tl.sum(bad.to(tl.int32), axis=0).to(tl.int64)
            negative += tl.sum(minus.to(tl.int32), axis=0).to(tl.int64)
            # Masked lanes skip their shared-memory atomic (Triton >= 3.9): pruned entries
            # do not pile onto one bin.
            hist += tl.histogram(key >> shift, NUM_BINS, mask=survivor)
            lo = tl.minimum(lo, tl.min(tl.where(survivor, key, 2147483647), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(survivor, key, -1), axis=0))
        tl.atomic_add(hist_ptr + bins, hist.to(tl.int64))
        tl.atomic_min(range_ptr, lo)
        tl.atomic_max(range_ptr + 1, hi)
        tl.atomic_add(bad_ptr, nonfinite)
        tl.atomic_add(bad_ptr + 1, negative)

    @triton.jit
    def _bit_words(flags, BLOCK: tl.constexpr):
        """int32 [BLOCK // 32]: bit j of word w is flags[32 w + j]."""
        lanes = tl.arange(0, 32)
        bits = tl.where(tl.reshape(flags, (BLOCK // 32, 32)), 1 << lanes[None, :], 0)
        return tl.sum(bits, axis=1)  # distinct bits: the sum is their OR

    @triton.jit
    def _split_block(
        scores_ptr, weight_ptr, words_ptr, counts_ptr, sums_ptr, block, n,
        sure_key, sel_key, live_lo, live_hi, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One block of the split pass: its bit words, counts and float64 partial sums.

        Returns (live, key) per lane for the histogram and the candidates.
        """
        start = block * BLOCK
        # int64 block start in the pointers, int32 offsets inside the block
        offs = tl.arange(0, BLOCK)
        rest = tl.minimum(n - start, BLOCK).to(tl.int32)
        inside, survivor, s, key = _load_keys(scores_ptr + start, weight_ptr + start, offs, rest)
        above = survivor & (key >= sure_key)
        sure = above & (key >= sel_key)
        live = survivor & (key >= live_lo) & (key <= live_hi)
        pick = live & (key >= 1)  # zero saliency is never selected
        words = tl.arange(0, BLOCK // 32)
        w_base = words_ptr + block * (BLOCK // 16)  # [sure words | live words] per block
        tl.store(w_base + words, _bit_words(sure, BLOCK))
        tl.store(w_base + BLOCK // 32 + words, _bit_words(pick, BLOCK))
        tl.store(counts_ptr + block * 3 + 0, tl.sum(sure.to(tl.int64), axis=0))
        tl.store(counts_ptr + block * 3 + 1, tl.sum(pick.to(tl.int64), axis=0))
        tl.store(counts_ptr + block * 3 + 2, tl.sum(live.to(tl.int64), axis=0))
        s64 = s.to(tl.float64)
        pruned = tl.sum(tl.where(inside & ~survivor, s64, 0.0), axis=0)
        tl.store(sums_ptr + block * 4 + 0, pruned)
        tl.store(sums_ptr + block * 4 + 1, tl.sum(tl.where(survivor, s64, 0.0), axis=0))
        tl.store(sums_ptr + block * 4 + 2, tl.sum(tl.where(sure, s64, 0.0), axis=0))
        tl.store(sums_ptr + block * 4 + 3, tl.sum(tl.where(pick, s64, 0.0), axis=0))
        return live, key, above

    # The keys and the shift stay runtime values: a key of 1 (an empty window's bounds, a
    # zero threshold) was specialized to a constant and left an 8-byte stack frame.
    @triton.jit(do_not_specialize=["sure_key", "sel_key", "live_lo", "live_hi", "shift"])
    def _split_kernel(
        scores_ptr, weight_ptr, words_ptr, counts_ptr, sums_ptr, hist_ptr, range_ptr,
        cand_key_ptr, cand_pos_ptr, cand_start_ptr, cand_total_ptr,
        n, sure_key, sel_key, live_lo, live_hi, shift, iters_per_program,
        WRITE_CANDIDATES: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The split pass: per block the bits of sure = {survivor, key >= max(sure_key,
        sel_key)} and of the live entries (survivors with live_lo <= key <= live_hi) that
        have key >= 1, their counts and float64 sums; the histogram of the live entries'
        digit (key - live_lo) >> shift; range = (min, max) live key, min key >= sure_key;
        with WRITE_CANDIDATES, the live entries' (key, position), each block's in order."""
        pid = tl.program_id(0).to(tl.int64)
        n_programs = tl.num_programs(0).to(tl.int64)
        bins = tl.arange(0, NUM_BINS)
        hist = tl.zeros((NUM_BINS,), dtype=tl.int32)
        lo = tl.zeros((), dtype=tl.int32) + 2147483647
        hi = tl.zeros((), dtype=tl.int32) - 1
        above_lo = tl.zeros((), dtype=tl.int32) + 2147483647
        for it in range(iters_per_program):
            block = pid + it * n_programs
            live, key, above = _split_block(
                scores_ptr, weight_ptr, words_ptr, counts_ptr, sums_ptr, block, n,
                sure_key, sel_key, live_lo, live_hi, BLOCK,
            )  # fmt: skip
            # Masked: the many entries outside the window add no contended atomic.
            hist += tl.histogram((key - live_lo) >> shift, NUM_BINS, mask=live)
            lo = tl.minimum(lo, tl.min(tl.where(live, key, 2147483647), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(live, key, -1), axis=0))
            above_lo = tl.minimum(above_lo, tl.min(tl.where(above, key, 2147483647), axis=0))
            if WRITE_CANDIDATES:
                # One reservation a block keeps each block's candidates contiguous and in
                # position order, so later passes can sum them per block deterministically.
                ones = live.to(tl.int32)
                base = tl.atomic_add(cand_total_ptr, tl.sum(ones, axis=0).to(tl.int64))
                rank = base + tl.cumsum(ones, axis=0) - 1
                pos = block * BLOCK + tl.arange(0, BLOCK)
                tl.store(cand_key_ptr + rank, key, mask=live)
                tl.store(cand_pos_ptr + rank, pos.to(cand_pos_ptr.dtype.element_ty), mask=live)
                tl.store(cand_start_ptr + block, base)
        tl.atomic_add(hist_ptr + bins, hist.to(tl.int64))
        tl.atomic_min(range_ptr, lo)
        tl.atomic_max(range_ptr + 1, hi)
        tl.atomic_min(range_ptr + 2, above_lo)

    @triton.jit(do_not_specialize=["live_lo", "live_hi", "shift"])
    def _candidate_pass_kernel(
        cand_key_ptr, hist_ptr, range_ptr, total, live_lo, live_hi, shift, iters_per_program,
        NUM_BINS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The split pass's histogram and live range, over the candidate keys only."""
        pid = tl.program_id(0).to(tl.int64)
        n_programs = tl.num_programs(0).to(tl.int64)
        bins = tl.arange(0, NUM_BINS)
        hist = tl.zeros((NUM_BINS,), dtype=tl.int32)
        lo = tl.zeros((), dtype=tl.int32) + 2147483647
        hi = tl.zeros((), dtype=tl.int32) - 1
        for it in range(iters_per_program):
            offs = (pid + it * n_programs) * BLOCK + tl.arange(0, BLOCK)
            key = tl.load(cand_key_ptr + offs, mask=offs < total, other=-1)
            live = (key >= live_lo) & (key <= live_hi)  # live_lo >= 0: padding is dead
            # Masked: the many entries outside the window add no contended atomic.
            hist += tl.histogram((key - live_lo) >> shift, NUM_BINS, mask=live)
            lo = tl.minimum(lo, tl.min(tl.where(live, key, 2147483647), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(live, key, -1), axis=0))
        tl.atomic_add(hist_ptr + bins, hist.to(tl.int64))
        tl.atomic_min(range_ptr, lo)
        tl.atomic_max(range_ptr + 1, hi)

    @triton.jit(do_not_specialize=["t_key", "sel_key"])
    def _candidate_select_kernel(
        cand_key_ptr, cand_pos_ptr, cand_start_ptr, counts_ptr, words_ptr, picked_ptr,
        picked_sum_ptr, range_ptr, t_key, sel_key, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Block b of the split: set the sure bits of its candidates with key >= sel_key;
        picked[b], picked_sum[b] = their count and float64 score sum; range[2] = min
        candidate key >= t_key."""
        block = tl.program_id(0).to(tl.int64)
        start = tl.load(cand_start_ptr + block)
        offs = tl.arange(0, BLOCK)
        inside = offs < tl.load(counts_ptr + block * 3 + 2)  # the block's live count
        key = tl.load(cand_key_ptr + start + offs, mask=inside, other=-1)
        pos = tl.load(cand_pos_ptr + start + offs, mask=inside, other=0).to(tl.int64)
        pick = inside & (key >= sel_key)
        tl.store(picked_ptr + block, tl.sum(pick.to(tl.int64), axis=0))
        s64 = key.to(tl.float32, bitcast=True).to(tl.float64)
        tl.store(picked_sum_ptr + block, tl.sum(tl.where(pick, s64, 0.0), axis=0))
        at_or_above = tl.where(inside & (key >= t_key), key, 2147483647)
        tl.atomic_min(range_ptr + 2, tl.min(at_or_above, axis=0))
        local = (pos - block * BLOCK).to(tl.int32)
        bit = tl.where(pick, 1 << (local & 31), 0)
        # Integer OR: exact whatever the order; only this block's words are touched.
        tl.atomic_or(words_ptr + block * (BLOCK // 16) + (local >> 5), bit, mask=pick)

    @triton.jit
    def _write_kernel(
        words_ptr, block_start_ptr, index_ptr, TAKE_LIVE: tl.constexpr, BLOCK: tl.constexpr
    ):
        """index[block_start[b] + j] = flat position of the j-th set bit of block b."""
        block = tl.program_id(0).to(tl.int64)
        words = tl.load(words_ptr + block * (BLOCK // 16) + tl.arange(0, BLOCK // 32))
        if TAKE_LIVE:
            live = words_ptr + block * (BLOCK // 16) + BLOCK // 32
            words = words | tl.load(live + tl.arange(0, BLOCK // 32))
        lanes = tl.arange(0, 32)
        bits = tl.reshape(((words[:, None] >> lanes[None, :]) & 1) != 0, (BLOCK,))
        rank = tl.cumsum(bits.to(tl.int32), axis=0) - 1
        start = tl.load(block_start_ptr + block)
        pos = block * BLOCK + tl.arange(0, BLOCK)
        tl.store(index_ptr + start + rank, pos.to(index_ptr.dtype.element_ty), mask=bits)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output written in full (tests patch this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _grid_programs(n: int, block: int, device: torch.device, per_sm: int = 4) -> int:
    """Persistent-kernel grid: at most `per_sm` programs per SM (4 on the CPU interpreter)."""
    blocks = triton.cdiv(n, block)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(blocks, per_sm * sms))
    return max(1, min(blocks, 4))


@launch_on_tensor_device
def _histogram_triton(scores, weight, prefix, prefix_shift, bits, shift, exponent):
    n = scores.numel()
    block = 32  # the mass kernel's one-hot tile: BLOCK x bins
    programs = _grid_programs(n, block, scores.device)
    iters = triton.cdiv(triton.cdiv(n, block), programs)
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
    args = (scores, weight, hist, n, prefix, prefix_shift, shift, exponent, iters)
    _digit_mass_kernel[(programs,)](*args, NUM_BINS=1 << bits, BLOCK=block)
    return hist


def _histogram_torch(scores, weight, prefix, prefix_shift, bits, shift, exponent):
    key = keys(scores)
    live = (weight.reshape(-1) != 0) & ((key >> prefix_shift) == prefix)
    digit = ((key[live] >> shift) & ((1 << bits) - 1)).long()
    mass = torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
    return mass.index_add_(0, digit, fixed_point(scores, exponent)[live])  # exact, any order


def histogram(layer: Layer, prefix: int, prefix_shift: int, bits: int, shift: int, exponent: int):
    """One digit's mass histogram of a layer's live keys: int64 [2**bits] on its device.

    Live keys: those of survivors whose bits above `prefix_shift` spell `prefix`
    (prefix_shift 31: every survivor). Bin d holds, over the live keys with
    (key >> shift) & (2**bits - 1) == d, the sum of floor(s * 2**exponent)
    (`fixed_point`; the caller keeps every sum below 2**63). One full read.
    """
    scores, weight, backend = layer
    _count_read(scores, scores.numel())
    if backend == "triton" and scores.numel():
        return _histogram_triton(scores, weight, prefix, prefix_shift, bits, shift, exponent)
    return _histogram_torch(scores, weight, prefix, prefix_shift, bits, shift, exponent)


def layer_histograms(layers: Sequence[Layer], *, exponent: int, device=None) -> Histograms:
    """The `Histograms` callback whose search i is layers[i]: row j is `histogram` of
    layers[searches[j]] at prefixes[j], moved to `device` (None: left where it is)."""

    def histograms(searches, prefixes, prefix_shift, bits, shift):
        rows = [
            histogram(layers[i], p, prefix_shift, bits, shift, exponent)
            for i, p in zip(searches, prefixes)
        ]
        _count_sync()
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


# ---------------------------------------------------------------------------------------
# Counting selection: first pass, split pass, candidate passes, emit (module docstring).


@launch_on_tensor_device
def _first_pass_triton(scores, weight) -> torch.Tensor:
    n, dev = scores.numel(), scores.device
    programs = _grid_programs(n, FIRST_BLOCK, dev)
    iters = triton.cdiv(triton.cdiv(n, FIRST_BLOCK), programs)
    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)
    key_range = torch.tensor([KEY_NONE, -1], dtype=torch.int32, device=dev)
    bad = torch.zeros(2, dtype=torch.int64, device=dev)
    _first_pass_kernel[(programs,)](
        scores, weight, hist, key_range, bad, n, FIRST_SHIFT, iters,
        NUM_BINS=NUM_BINS, BLOCK=FIRST_BLOCK, num_warps=8,
    )  # fmt: skip
    return _row(hist, n, key_range[0], key_range[1], KEY_NONE, bad)


def _first_pass_torch(scores, weight) -> torch.Tensor:
    every = keys(scores)
    nonfinite = every >= 0x7F800000
    negative = (scores.reshape(-1).view(torch.int32) < 0) & (every != 0) & ~nonfinite
    bad = torch.stack([nonfinite.sum(), negative.sum()])
    key = every[weight.reshape(-1) != 0]
    hist = torch.bincount((key >> FIRST_SHIFT).long(), minlength=NUM_BINS)
    lo, hi = _key_range(key)
    return _row(hist, scores.numel(), lo, hi, KEY_NONE, bad)


def _key_range(key: torch.Tensor) -> tuple:
    """(min, max) of int32 keys, (KEY_NONE, -1) when there are none."""
    if key.numel() == 0:
        return KEY_NONE, -1
    lo, hi = torch.aminmax(key)
    return lo, hi


def _row(hist, numel, lo, hi, above_lo, bad=(0, 0)) -> torch.Tensor:
    """A pass's int64 row: [hist (NUM_BINS) | NaN-or-inf scores | negative scores | numel |
    live min | live max | min key at or above the sure key] (`_merge` sums the columns up
    to numel, mins and maxes the others). The bad counts and numel: first pass only."""
    dev = hist.device
    tail = [*bad, numel, lo, hi, above_lo]
    tail = [torch.as_tensor(v, device=dev).reshape(1).long() for v in tail]
    return torch.cat([hist.long(), *tail])


# Columns of a row after the histogram.
_NONFINITE, _NEGATIVE, _NUMEL = NUM_BINS, NUM_BINS + 1, NUM_BINS + 2


def _merge(rows: np.ndarray) -> np.ndarray:
    """Rows [..., R, C] merged over R (the `_row` layout): histograms and numel summed,
    live min, live max and the min key at or above the sure key taken."""
    return np.concatenate(
        [
            rows[..., :-3].sum(-2),
            rows[..., -3].min(-1, keepdims=True),
            rows[..., -2].max(-1, keepdims=True),
            rows[..., -1].min(-1, keepdims=True),
        ],
        -1,
    )


def combine_ranks(tables: torch.Tensor) -> torch.Tensor:
    """Every rank's pass rows [ranks, layers, C] -> the whole tensors' rows [layers, C]
    (`_merge` over the ranks), for the layers of a sharded selection."""
    merged = _merge(tables.cpu().numpy().swapaxes(0, 1))
    return torch.from_numpy(merged).to(tables.device)


class _Run:
    """One layer's buffers during a selection, on its device.

    words: int32 [n_blocks, 2, SPLIT_BLOCK // 32]: per block the bits of the sure
    entries, then of the live ones with key >= 1. counts: int64 [n_blocks, 3] (sure,
    live with key >= 1, live); sums: float64 [n_blocks, 4] (I_P, I_S, sure, live with
    key >= 1). Candidates: keys (int32), positions, each block's first slot, their total.
    """

    def __init__(self, layer: Layer):
        self.layer = layer
        self.n = layer[0].numel()
        self.n_blocks = -(-self.n // SPLIT_BLOCK)
        self.triton = layer[2] == "triton" and self.n > 0
        self.words = self.counts = self.sums = None
        self.cand_key = self.cand_pos = self.cand_start = None
        self.cand_total = 0
        self.picked = self.picked_sum = None  # per block, from the candidate select
        self.take_live = False

    def count(self, elements: int) -> None:
        _count_read(self.layer[0], elements)


def _split(run: _Run, sure_key: int, window, shift: int, capacity) -> torch.Tensor:
    """The split pass of one layer (one full read); returns its row.

    sure: survivors with key >= max(sure_key, 1); live: survivors with key in the
    inclusive `window` (None: no live entry), histogrammed by (key - lo) >> shift;
    capacity: the layer's live count, to write them as candidates, or None.
    """
    scores, weight, _ = run.layer
    dev = scores.device
    lo, hi = window if window is not None else (KEY_NONE, -1)  # no live entry
    sure_key = min(sure_key, KEY_NONE)  # no finite score has key 2**31 - 1 (a NaN)
    # Triton's persistent grid may step past the last block: room for those (all-zero)
    # blocks keeps the kernel free of scalar masks; the views hold the real blocks.
    nb, padded = run.n_blocks, _split_grid(run)[0] * _split_grid(run)[1]
    run.words = _empty((padded, 2, SPLIT_BLOCK // 32), torch.int32, dev)[:nb]
    run.counts = _empty((padded, 3), torch.int64, dev)[:nb]
    run.sums = _empty((padded, 4), torch.float64, dev)[:nb]
    run.picked = run.picked_sum = None
    run.take_live = False
    run.count(run.n)
    if capacity is not None:
        run.cand_key = _empty(max(capacity, 1), torch.int32, dev)[:capacity]
        run.cand_pos = _empty(max(capacity, 1), index_dtype(run.n), dev)[:capacity]
        run.cand_start = _empty(padded, torch.int64, dev)[:nb]
        run.cand_total = capacity
    else:
        run.cand_key = run.cand_pos = run.cand_start = None
        run.cand_total = 0
    args = (run, sure_key, max(sure_key, 1), lo, hi, shift)
    if run.triton:
        return _split_triton(scores, *args)
    return _split_torch(scores, *args)


def _split_grid(run: _Run) -> tuple[int, int]:
    """(programs, blocks a program) of the split kernel; (n_blocks, 1) on PyTorch."""
    if not run.triton:
        return run.n_blocks, 1
    # 8 warps of ~100 registers (compile lane): two programs fit an SM's 64K registers
    programs = _grid_programs(run.n, SPLIT_BLOCK, run.layer[0].device, per_sm=2)
    return programs, triton.cdiv(run.n_blocks, programs)


@launch_on_tensor_device
def _split_triton(scores, run, sure_key, sel_key, lo, hi, shift) -> torch.Tensor:
    dev = scores.device
    programs, iters = _split_grid(run)
    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)
    key_range = torch.tensor([KEY_NONE, -1, KEY_NONE], dtype=torch.int32, device=dev)
    write = run.cand_key is not None
    total = torch.zeros(1, dtype=torch.int64, device=dev)
    dummy = total  # never read or written without WRITE_CANDIDATES
    _split_kernel[(programs,)](
        scores, run.layer[1], run.words, run.counts, run.sums, hist, key_range,
        run.cand_key if write else dummy, run.cand_pos if write else dummy,
        run.cand_start if write else dummy, total,
        run.n, sure_key, sel_key, lo, hi, shift, iters,
        WRITE_CANDIDATES=write, NUM_BINS=NUM_BINS, BLOCK=SPLIT_BLOCK, num_warps=8,
    )  # fmt: skip
    return _row(hist, 0, key_range[0], key_range[1], key_range[2])


def _per_block(values: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """values [n] zero-padded to [n_blocks, SPLIT_BLOCK]."""
    padded = values.new_zeros(n_blocks * SPLIT_BLOCK)
    padded[: values.numel()] = values
    return padded.view(n_blocks, SPLIT_BLOCK)


def _pack_bits(flags: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """bool [n] -> int32 [n_blocks, SPLIT_BLOCK // 32] words, bit j of word w = flag 32w+j."""
    bits = _per_block(flags.long(), n_blocks).view(n_blocks, SPLIT_BLOCK // 32, 32)
    words = (bits << torch.arange(32, device=flags.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _split_torch(scores, run, sure_key, sel_key, lo, hi, shift) -> torch.Tensor:
    s, key = scores.reshape(-1), keys(scores)
    survivor = run.layer[1].reshape(-1) != 0
    above = survivor & (key >= sure_key)
    sure = above & (key >= sel_key)
    live = survivor & (key >= lo) & (key <= hi)
    pick = live & (key >= 1)
    nb = run.n_blocks
    run.words.copy_(torch.stack([_pack_bits(sure, nb), _pack_bits(pick, nb)], 1))
    run.counts.copy_(torch.stack([_per_block(m.long(), nb).sum(1) for m in (sure, pick, live)], 1))
    s64 = s.double()
    parts = [~survivor, survivor, sure, pick]
    run.sums.copy_(torch.stack([_per_block(s64 * m, nb).sum(1) for m in parts], 1))
    hist = torch.bincount(((key[live] - lo) >> shift).long(), minlength=NUM_BINS)
    if run.cand_key is not None:
        where = torch.nonzero(live).view(-1)
        run.cand_key.copy_(key[where])
        run.cand_pos.copy_(where)
        run.cand_start.copy_(torch.cumsum(run.counts[:, 2], 0) - run.counts[:, 2])
    live_lo, live_hi = _key_range(key[live])
    above_lo = _key_range(key[above])[0]
    return _row(hist, 0, live_lo, live_hi, above_lo)


def _candidate_pass(run: _Run, window, shift: int) -> torch.Tensor:
    """The split pass's histogram and live range over the layer's candidates only."""
    lo, hi = window
    run.count(run.cand_total)
    dev = run.layer[0].device
    if run.triton and run.cand_total:
        return _candidate_pass_triton(run.cand_key, lo, hi, shift, run.cand_total)
    key = run.cand_key
    live = (key >= lo) & (key <= hi)
    hist = torch.bincount(((key[live] - lo) >> shift).long(), minlength=NUM_BINS).to(dev)
    live_lo, live_hi = _key_range(key[live])
    return _row(hist, 0, live_lo, live_hi, KEY_NONE)


@launch_on_tensor_device
def _candidate_pass_triton(cand_key, lo, hi, shift, total) -> torch.Tensor:
    dev = cand_key.device
    programs = _grid_programs(total, FIRST_BLOCK, dev)
    iters = triton.cdiv(triton.cdiv(total, FIRST_BLOCK), programs)
    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)
    key_range = torch.tensor([KEY_NONE, -1], dtype=torch.int32, device=dev)
    _candidate_pass_kernel[(programs,)](
        cand_key, hist, key_range, total, lo, hi, shift, iters,
        NUM_BINS=NUM_BINS, BLOCK=FIRST_BLOCK,
    )  # fmt: skip
    return _row(hist, 0, key_range[0], key_range[1], KEY_NONE)


def _candidate_select(run: _Run, t_key: int) -> torch.Tensor:
    """Adds the candidates with key >= max(t_key, 1) to the sure bits, per block counts
    and sums (`run.picked`, `run.picked_sum`); returns a row whose last entry is the
    smallest candidate key >= t_key."""
    dev = run.layer[0].device
    run.count(run.cand_total + 2 * run.n_blocks)  # candidates, block starts and counts
    run.picked = _empty(run.n_blocks, torch.int64, dev)
    run.picked_sum = _empty(run.n_blocks, torch.float64, dev)
    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)
    if run.triton:
        key_range = torch.tensor([KEY_NONE, -1, KEY_NONE], dtype=torch.int32, device=dev)
        _candidate_select_triton(run.cand_key, run, key_range, t_key)
        return _row(hist, 0, KEY_NONE, -1, key_range[2])
    key, pos = run.cand_key, run.cand_pos.long()
    pick = key >= max(t_key, 1)
    block = pos // SPLIT_BLOCK
    run.picked.copy_(torch.bincount(block[pick], minlength=run.n_blocks))
    sums = torch.zeros(run.n_blocks, dtype=torch.float64, device=dev)
    run.picked_sum.copy_(sums.index_add_(0, block[pick], key[pick].view(torch.float32).double()))
    words = (run.words[:, 0].reshape(-1).long() & 0xFFFFFFFF).index_add_(
        0, pos[pick] // 32, 1 << (pos[pick] % 32)
    )  # candidates are not sure entries: their bits are clear, so add is OR
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    run.words[:, 0].copy_(words.view(run.n_blocks, SPLIT_BLOCK // 32))
    return _row(hist, 0, KEY_NONE, -1, _key_range(key[key >= t_key])[0])


@launch_on_tensor_device
def _candidate_select_triton(cand_key, run, key_range, t_key) -> None:
    _candidate_select_kernel[(run.n_blocks,)](
        cand_key, run.cand_pos, run.cand_start, run.counts, run.words, run.picked,
        run.picked_sum, key_range, t_key, max(t_key, 1), BLOCK=SPLIT_BLOCK,
    )  # fmt: skip


def _emit_counts(run: _Run) -> torch.Tensor:
    """int64 [n_blocks]: selected entries per block."""
    counts = run.counts[:, 0]
    if run.take_live:
        counts = counts + run.counts[:, 1]
    if run.picked is not None:
        counts = counts + run.picked
    return counts


def _importances(run: _Run) -> torch.Tensor:
    """float64 [3]: I_P, I_S, I_G, each a sum of per-block partials in block order."""
    selected = run.sums[:, 2]
    if run.take_live:
        selected = selected + run.sums[:, 3]
    if run.picked_sum is not None:
        selected = selected + run.picked_sum
    return torch.stack([run.sums[:, 0].sum(), run.sums[:, 1].sum(), selected.sum()])


def _write(run: _Run, counts: torch.Tensor, n_selected: int) -> torch.Tensor:
    """The sorted flat index of the selected bits (reads the bit words only)."""
    dev = run.layer[0].device
    index = _empty(n_selected, index_dtype(run.n), dev)
    if n_selected == 0:
        return index
    words_read = run.n_blocks * SPLIT_BLOCK // 32 * (2 if run.take_live else 1)
    run.count(words_read + 3 * run.n_blocks)  # bit words; counts summed, scanned, read
    starts = torch.cumsum(counts, 0) - counts
    if run.triton:
        _write_triton(run.words, starts, index, run.take_live)
        return index
    words = run.words[:, 0] | run.words[:, 1] if run.take_live else run.words[:, 0]
    bits = (words.reshape(-1, 1).long() >> torch.arange(32, device=dev)) & 1
    index.copy_(torch.nonzero(bits.view(-1)[: run.n]).view(-1))
    return index


@launch_on_tensor_device
def _write_triton(words, starts, index, take_live) -> None:
    _write_kernel[(words.shape[0],)](
        words, starts, index, TAKE_LIVE=take_live, BLOCK=SPLIT_BLOCK
    )  # fmt: skip


def _emit(runs: Sequence[_Run], extra: torch.Tensor | None = None):
    """(sorted index, float64 [I_P, I_S, I_G]) of every run; one host sync for all, which
    also brings `extra` (when given, returns (the list, extra on the host))."""
    counts = [_emit_counts(run) for run in runs]
    totals = torch.stack([c.sum() for c in counts]) if runs else torch.zeros(0)
    if extra is not None:
        host = _to_host(torch.cat([totals.to(extra.device).reshape(-1), extra.reshape(-1)]))
        n_selected, extra = host[: len(runs)], host[len(runs) :].reshape(extra.shape)
    else:
        n_selected = _to_host(totals) if runs else []
    emitted = [
        (_write(run, c, int(total)), _importances(run))
        for run, c, total in zip(runs, counts, n_selected)
    ]
    return emitted if extra is None else (emitted, extra)


class _Search:
    """One threshold search over the layers `members` (positions into the runs).

    Invariant while open: tau's key lies in the inclusive window [lo, hi]; rank is its
    rank from the top among the survivors in the window, count how many those are;
    every survivor above hi is selected. Resolved at key t: the selection is every
    survivor with key >= max(t, 1) and tau is the smallest survivor key >= t.
    """

    def __init__(self, members: list[int], target: int, capacity: int):
        self.members, self.target, self.capacity = members, target, capacity
        self.lo, self.hi, self.rank, self.count = 0, KEY_NONE, target, 0
        self.frame = (0, FIRST_SHIFT)  # (lo, shift) of the pending histogram's digits
        self.local = None  # per member: its survivors in the window (sizes candidates)
        self.t: int | None = None  # resolution key
        self.finish = "split"  # how the selection is completed once resolved
        self.split_lo = -1  # smallest live key of the last split's window (-1: none yet)
        self.candidates = False  # the last split wrote the window's candidates
        self.tau: int | None = None

    @property
    def open(self) -> bool:
        return self.t is None and self.target > 0

    def narrow(self, row: np.ndarray, local: np.ndarray, after_split: bool) -> None:
        """Narrow the window with a histogram row (`_row` layout) of its live entries."""
        if after_split:
            self.split_lo = int(row[-3])
        lo, hi = max(self.lo, int(row[-3])), min(self.hi, int(row[-2]))
        if lo < hi:
            digit, self.rank = find_digit(row[:NUM_BINS], self.rank)
            base, shift = self.frame
            self.count = int(row[digit])
            lo = max(lo, base + (digit << shift))
            hi = min(hi, base + ((digit + 1) << shift) - 1)
            self.local = local[:, digit]
        self.lo, self.hi = lo, hi
        if lo == hi or self.rank == self.count:  # early stop: the whole window is needed
            self.resolve(lo)
        else:
            self.frame = (lo, max(0, (hi - lo).bit_length() - DIGIT_BITS))

    def resolve(self, t: int) -> None:
        self.t = t
        if t <= self.split_lo:  # every live entry of the last split is selected
            self.finish, self.tau = "live", self.split_lo
        elif self.candidates:
            self.finish = "candidates"
        else:
            self.finish = "split"


def _to_host(t: torch.Tensor) -> np.ndarray:
    """A device tensor on the host: one sync, counted."""
    _count_sync()
    return t.cpu().numpy()


def _pass_table(rows, reduce) -> tuple[np.ndarray, np.ndarray]:
    """(local, reduced) tables of stacked rows, on the host in one sync."""
    local = torch.stack(rows)
    both = torch.stack([local, reduce(local).to(local.device)])
    host = _to_host(both)
    return host[0], host[1]


def _empty_row(device) -> torch.Tensor:
    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=device)
    return _row(hist, 0, KEY_NONE, -1, KEY_NONE)


def _first_pass(run: _Run) -> torch.Tensor:
    scores, weight, _ = run.layer
    run.count(run.n)
    if run.triton:
        return _first_pass_triton(scores, weight)
    return _first_pass_torch(scores, weight)


def _check_scores(runs, table: np.ndarray) -> None:
    """The first pass's input check: ValueError on a NaN, inf or negative score."""
    if table[:, _NONFINITE].any():
        raise ValueError("scores must be finite (got NaN or inf)")
    if table[:, _NEGATIVE].any():
        low = min(float(run.layer[0].min()) for run in runs if run.n)
        raise ValueError(f"scores must be >= 0 (saliency), got a minimum of {low}")


def _start_searches(runs, groups, targets, reduce, validate: bool):
    """Pass 1 over every layer: the searches, narrowed to their first digit's bucket, and
    |S| per layer. validate: raise on bad scores (`_check_scores`) first."""
    local, table = _pass_table([_first_pass(run) for run in runs], reduce)
    if validate:
        _check_scores(runs, table)
    n_survivors = [int(x) for x in table[:, :NUM_BINS].sum(1)]
    searches = []
    for members, target in zip(groups, targets(n_survivors)):
        capacity = int(table[members, _NUMEL].sum()) // CANDIDATE_FRACTION
        search = _Search(list(members), int(target), capacity)
        if search.target > 0:
            search.narrow(_merge(table[members]), local[members], after_split=False)
        searches.append(search)
    return searches, n_survivors


def _refine(runs, search: _Search, rows: list) -> None:
    """Launch the next pass of an open search: over its candidates when the last split
    wrote them, else a full split (writing candidates when the window fits)."""
    window, shift = (search.lo, search.hi), search.frame[1]
    if search.candidates:
        for i in search.members:
            rows[i] = _candidate_pass(runs[i], window, shift)
        return
    search.candidates = search.count <= search.capacity
    for j, i in enumerate(search.members):
        fit = int(search.local[j]) if search.candidates else None
        rows[i] = _split(runs[i], search.hi + 1, window, shift, fit)


def _finish(runs, searches) -> tuple[list, list[_Search]]:
    """Complete every resolved search's selection (module docstring). Returns (one row
    per layer whose last entry is its smallest selected key at or above t, the searches
    whose tau that gives)."""
    device = runs[0].layer[0].device
    rows = [_empty_row(device) for _ in runs]
    needed = [s for s in searches if s.finish in ("candidates", "split") and s.t is not None]
    for search in searches:
        for i in search.members:
            runs[i].take_live = search.finish == "live"
            if search in needed and search.finish == "candidates":
                rows[i] = _candidate_select(runs[i], search.t)
            elif search in needed:
                rows[i] = _split(runs[i], search.t, None, 0, None)
    return rows, needed


def _first_splits(runs, searches) -> list:
    """The split pass of every layer (every layer needs one for its emit): open searches
    split at their window; resolved ones (and r == 0) at their selection key."""
    rows = [None] * len(runs)
    for search in searches:
        if search.open:
            search.candidates = search.count <= search.capacity
        for j, i in enumerate(search.members):
            if search.open:
                fit = int(search.local[j]) if search.candidates else None
                window, shift = (search.lo, search.hi), search.frame[1]
                rows[i] = _split(runs[i], search.hi + 1, window, shift, fit)
            else:
                key = NO_SELECTION_KEY if search.t is None else search.t
                rows[i] = _split(runs[i], key, None, 0, None)
    return rows


def select_searches(
    layers: Sequence[Layer],
    groups,
    targets,
    *,
    reduce=None,
    fixed_rounds: bool = False,
    validate: bool = False,
):
    """Radix select of independent top-count searches, then every layer's emit.

    Args:
        layers: (scores, weight, backend) triples, scores float32 contiguous.
        groups: per search, the positions of its layers (disjoint): one threshold each.
        targets: callable [|S| per layer] -> [r per search] (r = 0: select nothing).
        reduce: int64 table [layers, C] of this process's pass rows -> the whole
            tensors' rows (sharded layers: `combine_ranks` of an all-gather); None: as is.
            Called once per pass, for all layers together.
        fixed_rounds: call `reduce` the same number of times whatever the data (4).
        validate: the first pass also checks the scores (finite, >= 0), so the caller
            need not read them once more for that.
    Returns:
        ([per search the 31-bit key of its r-th largest survivor score, None when r is
        0], [|S| per layer], [(sorted index, float64 [I_P, I_S, I_G]) per layer]).
    Raises:
        ValueError: with validate, a NaN, inf or negative score.
    """
    reduce_given = reduce is not None
    reduce = reduce or (lambda table: table)
    runs = [_Run(layer) for layer in layers]
    searches, n_survivors = _start_searches(runs, groups, targets, reduce, validate)
    for search in searches:
        if search.t is not None:  # resolved by pass 1: the split below completes it
            search.finish = "first"
    rows = _first_splits(runs, searches)
    rounds, after_split = 0, [s.open for s in searches]
    while True:
        local, table = _pass_table(rows, reduce)
        for search, split in zip(searches, after_split):
            if search.open:
                search.narrow(_merge(table[search.members]), local[search.members], split)
            elif search.finish == "first":
                search.tau, search.finish = int(_merge(table[search.members])[-1]), "done"
        if not (any(s.open for s in searches) or (fixed_rounds and rounds == 0)):
            break
        rounds += 1
        rows = [_empty_row(runs[0].layer[0].device) for _ in runs]
        after_split = [s.open and not s.candidates for s in searches]
        for search in searches:
            if search.open:
                _refine(runs, search, rows)
    rows, needed = _finish(runs, searches)
    if reduce_given and (needed or fixed_rounds):
        table = _pass_table(rows, reduce)[1]
        emitted = _emit(runs)
    else:  # the taus come to the host with the selected counts, in one sync
        emitted, table = _emit(runs, torch.stack(rows))
    for search in needed:
        search.tau = int(_merge(table[search.members])[-1])
    return [s.tau if s.target else None for s in searches], n_survivors, emitted


def top_k(layers: Sequence[Layer], k: float, *, validate: bool = False) -> list[Selection]:
    """Selections of the r-th largest survivor score over all `layers` together.

    r = ceil(k * sum_l |S_l|) (`num_selected`); one search, so every layer shares tau;
    no concatenated copy of the scores is made.

    Args:
        layers: (scores, weight, backend) triples on one device; k: fraction in (0, 1].
        validate: check the scores in the first pass (`select_searches`).
    Returns:
        One Selection per layer (threshold: the shared tau, +inf where G is empty).
    """

    def targets(n_survivors):
        return [num_selected(k, sum(n_survivors))]

    everyone = list(range(len(layers)))
    (tau_key,), n_survivors, emitted = select_searches(
        layers, [everyone], targets, validate=validate
    )
    return [
        _selection(layer, tau_key, n, index, sums)
        for layer, n, (index, sums) in zip(layers, n_survivors, emitted)
    ]


def _selection(layer: Layer, tau_key, n_survivors: int, index, sums) -> Selection:
    tau = threshold(tau_key, index.numel(), layer[0].device)
    i_p, i_s, i_g = sums.unbind()
    return Selection(index, tau, n_survivors, index.numel(), i_p, i_s, i_g)


def selection_key(tau_key: int | None) -> int:
    """The emit key of a threshold key: at least 1 (zero scores never selected);
    NO_SELECTION_KEY for None."""
    return NO_SELECTION_KEY if tau_key is None else max(tau_key, 1)


def threshold(tau_key: int | None, n_selected: int, device) -> torch.Tensor:
    """0-d float32 tau: the float of tau_key, or +inf when nothing is selected."""
    tau = key_to_float(tau_key) if tau_key is not None and n_selected else float("inf")
    return torch.tensor(tau, dtype=torch.float32, device=device)


def emit(layer: Layer, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G = {i : weight_i != 0 and key_i >= key} of one layer: a split pass (one full read)
    and a write from its bit words.

    Args:
        layer: (scores, weight, backend); key: an emit key (`selection_key`).
    Returns:
        (index: 1-D sorted flat indices of G, int32 below 2**31 entries else int64;
        float64 [3]: I_P, I_S, I_G, the score sums over pruned entries, survivors and G).
    """
    run = _Run(layer)
    _split(run, key, None, 0, None)
    return _emit([run])[0]


def selection_at_key(layer: Layer, tau_key: int | None, n_survivors: int) -> Selection:
    """The Selection G = {survivors with key >= max(tau_key, 1)} of one layer.

    Args:
        layer: (scores, weight, backend); tau_key: the threshold's key, None: select
            nothing; n_survivors: |S| of the layer (reported as is).
    Returns:
        Selection whose threshold is the float of tau_key (+inf when G is empty).
    """
    index, sums = emit(layer, selection_key(tau_key))
    return _selection(layer, tau_key, n_survivors, index, sums)
