"""Mass-based k (k="mass:m"): the fewest survivors holding a share m of the layer's saliency.

Definition (exact, in integers). Each score is read as a fixed-point integer
q_i = floor(s_i * 2**E) with one exponent per layer, E = 62 - ceil(log2 n) - e, where
max(s) < 2**e and n = numel: every q_i < 2**62 / n, so every sum fits in int64 and is
exact and independent of summation order (a float sum would let the boundary depend on
the order). Truncation costs under one unit 2**-E per entry: relative to the total at most
n / 2**(61 - ceil(log2 n)) in the worst case (one huge score, all others tiny), about
2**-29 for a 65K-entry layer; for typical saliency it is far smaller.

With the survivors sorted by score, s_(1) >= s_(2) >= ..., Q = sum of q over S and
target = ceil(m * Q) (exact, Fraction): r = the smallest count with
q_(1) + ... + q_(r) >= target, tau = s_(r), and G = {i in S : s_i >= tau, s_i > 0}.
Tie rule: every survivor equal to tau is selected, as in select_topk, so G may hold more
than the share. Q == 0 (all survivor scores zero) selects nothing.

Kernel: radix select over the same 7 + 8 + 8 + 8-bit digits as select.py, but each bin
sums q instead of counting entries; the first bin from the top whose running sum reaches
the remaining target holds tau. Per-program partial sums (one-hot reduction) are added
with integer atomics: exact and deterministic.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from sau_kernels import select as _sel
from sau_kernels._common import check_layer, launch_on_tensor_device, resolve_backend
from sau_kernels._threshold import (
    selection_at_key,
    torch_keys,
    torch_live,
)
from sau_kernels.selection import Selection

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None


def fixed_point_exponent(max_score: float, numel: int) -> int:
    """E such that floor(s * 2**E) < 2**62 / 2**ceil(log2 numel) for every s <= max_score.

    Args: max_score > 0 (a float32 value), numel >= 1.
    """
    _, e = math.frexp(max_score)  # max_score < 2**e
    return 62 - (numel - 1).bit_length() - e


def fixed_point(scores: torch.Tensor, exponent: int) -> torch.Tensor:
    """int64 q = floor(scores * 2**exponent), exact (a power-of-two scale in float64)."""
    return torch.floor(scores.reshape(-1).double() * 2.0**exponent).long()


if triton is not None:

    @triton.jit
    def _fixed_point_bits(key, exponent):
        """floor(s * 2**exponent) from s's 31-bit key, in integers (no float64 scalar)."""
        biased = key >> 23
        mant = key & 0x7FFFFF
        # normal: (1.mant) * 2**(biased - 127); subnormal: (0.mant) * 2**-126
        m = tl.where(biased > 0, mant | 0x800000, mant).to(tl.int64)
        sh = tl.where(biased > 0, biased, 1) - 150 + exponent
        left = tl.maximum(sh, 0).to(tl.int64)
        right = tl.minimum(tl.maximum(-sh, 0), 63).to(tl.int64)
        return (m << left) >> right

    @triton.jit
    def _mass_histogram_kernel(
        scores_ptr,
        weight_ptr,
        sums_ptr,
        live_count_ptr,
        n,
        prefix,
        prefix_shift,
        exponent,
        iters_per_program,
        SHIFT: tl.constexpr,
        NUM_BINS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Persistent programs; each sums q per bin privately (a one-hot reduction over a
        # [BLOCK, NUM_BINS] tile: no float and no contended atomics), then adds once.
        pid = tl.program_id(0).to(tl.int64)
        n_programs = tl.num_programs(0).to(tl.int64)
        bins = tl.arange(0, NUM_BINS)
        acc = tl.zeros((NUM_BINS,), dtype=tl.int64)
        n_live = tl.zeros((1,), dtype=tl.int64)
        for it in range(iters_per_program):
            offs = (pid + it * n_programs) * BLOCK + tl.arange(0, BLOCK)
            inside, survivor, s, key = _sel._load_keys(scores_ptr, weight_ptr, offs, n)
            live = survivor & ((key >> prefix_shift) == prefix)
            digit = (key >> SHIFT) & (NUM_BINS - 1)
            q = tl.where(live, _fixed_point_bits(key, exponent), 0)
            hit = digit[:, None] == bins[None, :]
            acc += tl.sum(tl.where(hit, q[:, None], 0), axis=0)
            n_live += tl.sum(live.to(tl.int64), axis=0)
        tl.atomic_add(sums_ptr + bins, acc)
        tl.atomic_add(live_count_ptr + tl.arange(0, 1), n_live)


@launch_on_tensor_device
def _bin_sums_triton(scores, weight, prefix, prefix_shift, exponent, bits, shift):
    n = scores.numel()
    block = 64  # the one-hot tile is BLOCK x 256 int64
    programs = _sel._grid_programs(n, block, scores.device)
    iters = triton.cdiv(triton.cdiv(n, block), programs)
    sums = torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
    count = torch.zeros(1, dtype=torch.int64, device=scores.device)
    _mass_histogram_kernel[(programs,)](
        scores,
        weight,
        sums,
        count,
        n,
        prefix,
        prefix_shift,
        exponent,
        iters,
        SHIFT=shift,
        NUM_BINS=1 << bits,
        BLOCK=block,
    )
    return sums.cpu().numpy(), int(count)


def _bin_sums_torch(scores, weight, prefix, prefix_shift, exponent, bits, shift):
    keys = torch_keys(scores)
    live = torch_live(keys, weight.reshape(-1) != 0, prefix, prefix_shift)
    digit = ((keys[live] >> shift) & ((1 << bits) - 1)).long()
    q = fixed_point(scores, exponent)[live]
    sums = torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
    sums.index_add_(0, digit, q)  # int64 adds: exact in any order
    return sums.cpu().numpy(), int(live.sum())


def mass_threshold_key(scores, weight, share: float, backend: str):
    """(tau_key or None, n_survivors) of the mass-based selection (module docstring)."""
    max_score = float(scores.max())
    if max_score == 0:  # every score zero: no mass to hold, nothing is selected
        return None, int((weight != 0).sum())
    exponent = fixed_point_exponent(max_score, scores.numel())
    bin_sums = _bin_sums_triton if backend == "triton" else _bin_sums_torch
    prefix, prefix_shift, target, n_survivors = 0, 31, None, 0
    for bits, shift in _sel._DIGITS:
        sums, n_live = bin_sums(scores, weight, prefix, prefix_shift, exponent, bits, shift)
        if target is None:
            n_survivors = n_live
            total = int(sums.sum())
            if total == 0:
                return None, n_survivors
            target = math.ceil(Fraction(share) * total)
        digit, target = _sel._find_digit(sums, target)
        prefix, prefix_shift = (prefix << bits) | digit, shift
    return prefix, n_survivors


@torch.no_grad()
def select_mass(scores, weight, share, *, backend=None) -> Selection:
    """The smallest top set of survivors by score holding `share` of their saliency.

    See the module docstring for the exact definition (int64 fixed-point sums, ties at
    tau all selected, zero scores never selected).

    Args:
        scores: float32, finite, >= 0; same numel and device as weight (any shape).
        weight: float32 | float16 | bfloat16 pruned weight (pruned entries are exact 0).
        share: float in (0, 1].
        backend: "triton" | "torch" | None.
    Returns:
        Selection (index sorted, threshold tau or +inf, counts, float64 importances).
    """
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"share must be a fraction in (0, 1], got {share!r}")
    scores, weight = check_layer(scores, weight)
    chosen = resolve_backend(backend, scores, weight)
    if scores.numel() == 0:
        return selection_at_key(scores, weight, None, 0, "torch")
    tau_key, n_survivors = mass_threshold_key(scores, weight, float(share), chosen)
    return selection_at_key(scores, weight, tau_key, n_survivors, chosen)
