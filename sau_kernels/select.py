"""Exact per-layer top-k selection over surviving weights, by radix select.

Saliency is finite and >= 0, so its float32 bit patterns (sign bit cleared, which also maps
-0.0 to 0) order exactly like the integers they spell. The r-th largest survivor score is
found digit by digit over those 31 bits, most significant first, with one histogram pass
per digit (7 + 8 + 8 + 8 bits) and a prefix scan of each 128- or 256-bin histogram on the
host. No sort and no size cap. Two more passes emit the sorted index list (per-block
counts, then an exclusive scan and a write) and the three importance sums (per-block
float64 partials, summed in a fixed order: deterministic).
"""

from __future__ import annotations

import numpy as np
import torch

from sau_kernels._common import (
    check_layer,
    index_dtype,
    launch_on_tensor_device,
    num_selected,
    resolve_backend,
)
from sau_kernels.selection import Selection

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None

# (bits per digit, shift of the digit) from the most significant digit down; 31 bits total.
# 7 + 8 + 8 + 8: on an H200, four passes with 128/256-bin histograms ran 2.5x faster than
# three with 2048/1024 bins (benchmarks/results/gpu-h200-run1: 1.92 ms vs 4.77 ms).
_DIGITS = ((7, 24), (8, 16), (8, 8), (8, 0))
_NO_SELECTION_KEY = 1 << 31  # larger than any 31-bit key: selects nothing

if triton is not None:

    @triton.jit
    def _load_keys(scores_ptr, weight_ptr, offs, n):
        """Survivor mask and 31-bit order-preserving keys for one block."""
        inside = offs < n
        w = tl.load(weight_ptr + offs, mask=inside, other=0.0)
        s = tl.load(scores_ptr + offs, mask=inside, other=0.0)
        key = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        return inside, w != 0.0, s, key

    @triton.jit
    def _radix_histogram_kernel(
        scores_ptr,
        weight_ptr,
        hist_ptr,
        n,
        prefix,
        prefix_shift,
        iters_per_program,
        SHIFT: tl.constexpr,
        NUM_BINS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Persistent programs: each accumulates a private histogram over many blocks and
        # adds it once (integer atomics: exact and order-independent).
        pid = tl.program_id(0).to(tl.int64)
        n_programs = tl.num_programs(0).to(tl.int64)
        hist = tl.zeros((NUM_BINS,), dtype=tl.int32)
        for it in range(iters_per_program):
            offs = (pid + it * n_programs) * BLOCK + tl.arange(0, BLOCK)
            inside, survivor, s, key = _load_keys(scores_ptr, weight_ptr, offs, n)
            live = survivor & ((key >> prefix_shift) == prefix)
            digit = (key >> SHIFT) & (NUM_BINS - 1)
            # Dead lanes are counted into bin 0, then taken out again: this avoids
            # histogram's mask argument, which older Triton releases lack.
            hist += tl.histogram(tl.where(live, digit, 0), NUM_BINS)
            n_dead = tl.sum((~live).to(tl.int32), axis=0)
            hist -= tl.where(tl.arange(0, NUM_BINS) == 0, n_dead, 0)
        tl.atomic_add(hist_ptr + tl.arange(0, NUM_BINS), hist.to(tl.int64))

    @triton.jit
    def _select_count_kernel(
        scores_ptr,
        weight_ptr,
        counts_ptr,
        sums_ptr,
        n,
        tau_key,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside, survivor, s, key = _load_keys(scores_ptr, weight_ptr, offs, n)
        selected = survivor & (key.to(tl.int64) >= tau_key)
        s64 = s.to(tl.float64)
        tl.store(counts_ptr + pid, tl.sum(selected.to(tl.int64), axis=0))
        tl.store(sums_ptr + pid * 3 + 0, tl.sum(tl.where(inside & ~survivor, s64, 0.0), axis=0))
        tl.store(sums_ptr + pid * 3 + 1, tl.sum(tl.where(survivor, s64, 0.0), axis=0))
        tl.store(sums_ptr + pid * 3 + 2, tl.sum(tl.where(selected, s64, 0.0), axis=0))

    @triton.jit
    def _select_write_kernel(
        scores_ptr,
        weight_ptr,
        block_start_ptr,
        index_ptr,
        n,
        tau_key,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside, survivor, s, key = _load_keys(scores_ptr, weight_ptr, offs, n)
        selected = survivor & (key.to(tl.int64) >= tau_key)
        # Position of each selected entry = its block's start + selected entries before it.
        rank = tl.cumsum(selected.to(tl.int64), axis=0) - 1
        start = tl.load(block_start_ptr + pid)
        tl.store(index_ptr + start + rank, offs.to(index_ptr.dtype.element_ty), mask=selected)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output (tests patch this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _find_digit(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th largest key (1-based) and that key's rank inside it."""
    from_top = np.cumsum(hist[::-1])
    pos = int(np.searchsorted(from_top, rank))  # first bin (from the top) reaching rank
    above = int(from_top[pos] - hist[::-1][pos])
    return len(hist) - 1 - pos, rank - above


def _grid_programs(n: int, block: int, device: torch.device) -> int:
    blocks = triton.cdiv(n, block)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(blocks, 4 * sms))
    return max(1, min(blocks, 4))


@launch_on_tensor_device
def histogram_triton(scores, weight, prefix: int, prefix_shift: int, bits: int, shift: int):
    """One radix-digit histogram (int64, 2**bits bins, on scores' device) of the survivor
    keys whose bits above `prefix_shift` equal `prefix` (prefix_shift 31: every survivor).

    Shared with sau_kernels.distributed, which sums these histograms across ranks.
    """
    n = scores.numel()
    hist_block = 2048
    programs = _grid_programs(n, hist_block, scores.device)
    iters = triton.cdiv(triton.cdiv(n, hist_block), programs)
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
    _radix_histogram_kernel[(programs,)](
        scores,
        weight,
        hist,
        n,
        prefix,
        prefix_shift,
        iters,
        SHIFT=shift,
        NUM_BINS=1 << bits,
        BLOCK=hist_block,
    )
    return hist


@launch_on_tensor_device
def emit_triton(scores, weight, tau_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The counting and writing passes: (sorted index of survivors with key >= tau_key,
    float64 [3] sums I_P, I_S, I_G over this tensor). Shared with sau_kernels.distributed."""
    n = scores.numel()
    block = 4096
    n_blocks = triton.cdiv(n, block)
    counts = _empty(n_blocks, dtype=torch.int64, device=scores.device)
    sums = _empty((n_blocks, 3), dtype=torch.float64, device=scores.device)
    _select_count_kernel[(n_blocks,)](scores, weight, counts, sums, n, tau_key, BLOCK=block)
    ends = torch.cumsum(counts, 0)
    n_selected = int(ends[-1])
    index = _empty(n_selected, dtype=index_dtype(n), device=scores.device)
    if n_selected:
        _select_write_kernel[(n_blocks,)](
            scores, weight, ends - counts, index, n, tau_key, BLOCK=block
        )
    return index, sums.sum(0)


@launch_on_tensor_device
def _select_triton(scores: torch.Tensor, weight: torch.Tensor, k: float) -> Selection:
    device = scores.device
    prefix, prefix_shift, rank = 0, 31, None
    n_survivors = 0
    for bits, shift in _DIGITS:
        h = histogram_triton(scores, weight, prefix, prefix_shift, bits, shift).cpu().numpy()
        if rank is None:  # first digit: every survivor is counted once
            n_survivors = int(h.sum())
            rank = num_selected(k, n_survivors)
            if rank == 0:
                break
        digit, rank = _find_digit(h, rank)
        prefix, prefix_shift = (prefix << bits) | digit, shift
    # key >= 1 is s > 0: zero saliency is never selected (DESIGN.md section 1).
    tau_key = max(prefix, 1) if n_survivors else _NO_SELECTION_KEY
    index, sums = emit_triton(scores, weight, tau_key)
    n_selected = index.numel()
    tau = np.array([prefix], dtype=np.uint32).view(np.float32)[0] if n_selected else np.inf
    threshold = torch.tensor(tau, dtype=torch.float32, device=device)
    i_p, i_s, i_g = sums.unbind()
    return Selection(index, threshold, n_survivors, n_selected, i_p, i_s, i_g)


def _select_torch(scores: torch.Tensor, weight: torch.Tensor, k: float) -> Selection:
    s = scores.view(-1)
    survivors = weight.view(-1) != 0
    values = s[survivors]  # boolean indexing: ~2x faster than masked_select on the CPU
    n_survivors = values.numel()
    r = num_selected(k, n_survivors)
    if r == 0:
        threshold = torch.tensor(float("inf"), dtype=torch.float32, device=s.device)
    elif r == n_survivors:
        threshold = values.min()
    else:
        # Selection in O(n), no sort: the r-th largest is the (n - r + 1)-th smallest.
        threshold = torch.kthvalue(values, n_survivors - r + 1).values
    # Zero saliency is never selected; s > 0 replaces s >= 0 when tau is 0.
    selected = survivors & ((s > 0) if float(threshold) == 0 else (s >= threshold))
    index = torch.nonzero(selected).view(-1).to(index_dtype(s.numel()))
    if index.numel() == 0:
        threshold = torch.tensor(float("inf"), dtype=torch.float32, device=s.device)
    f64 = torch.float64
    if n_survivors == s.numel():  # nothing pruned: I_P is exactly 0, skip a full pass
        importance_pruned = torch.zeros((), dtype=f64, device=s.device)
    else:
        importance_pruned = torch.where(survivors, 0.0, s).sum(dtype=f64)
    return Selection(
        index=index,
        threshold=threshold.reshape(()).clone(),
        n_survivors=n_survivors,
        n_selected=index.numel(),
        importance_pruned=importance_pruned,
        importance_survivors=values.sum(dtype=f64),
        importance_selected=values[values >= threshold].sum(dtype=f64),
    )


@torch.no_grad()  # reads scores and weight only; the Selection is never differentiated
def select_topk(scores, weight, k, *, backend=None) -> Selection:
    """Select the top-k fraction of surviving weights by score, exactly, ties included.

    r = ceil(k * |S|) over survivors S = {weight != 0}; tau = the r-th largest survivor
    score; G = {i in S : scores_i >= tau and scores_i > 0} (DESIGN.md section 1): a
    zero-saliency entry is never selected, so |G| may be below r, and an all-zero layer
    selects nothing (threshold +inf).

    Args:
        scores: float32, finite, >= 0; same numel and device as weight (any shape).
        weight: float32 | float16 | bfloat16 pruned weight (pruned entries are exact 0).
        k: float in (0, 1].
        backend: "triton" | "torch" | None.
    Returns:
        Selection with index (1-D, sorted, int32 below 2**31 elements), threshold (0-d
        float32 tau; +inf when nothing is selected), n_survivors, n_selected, and
        float64 importances I_P, I_S, I_G.
    """
    scores, weight = check_layer(scores, weight)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    if resolve_backend(backend, scores, weight) == "triton" and scores.numel():
        return _select_triton(scores, weight, float(k))
    return _select_torch(scores, weight, float(k))
