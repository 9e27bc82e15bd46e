"""Mass-based k (k="mass:m"): the fewest survivors holding a share m of the layer's saliency.

Definition (exact, in integers). Each score is read as a fixed-point integer
q_i = floor(s_i * 2**E) with one exponent per layer, E = 62 - ceil(log2 n) - e, where
max(s) < 2**e and n = numel (`radix.fixed_point_exponent`): every q_i < 2**62 / n, so
every sum fits in int64 and is exact and independent of summation order (a float sum would
let the boundary depend on the order). Truncation costs under one unit 2**-E per entry:
relative to the total at most n / 2**(61 - ceil(log2 n)) in the worst case (one huge
score, all others tiny), about 2**-29 for a 65K-entry layer; for typical saliency it is
far smaller.

With the survivors sorted by score, s_(1) >= s_(2) >= ..., Q = sum of q over S and
target = ceil(m * Q) (exact, Fraction): r = the smallest count with
q_(1) + ... + q_(r) >= target, tau = s_(r), and G = {i in S : s_i >= tau, s_i > 0}.
Tie rule: every survivor equal to tau is selected, as in select_topk, so G may hold more
than the share. Q == 0 (all survivor scores zero) selects nothing.

Search: `radix.threshold_keys` with histograms whose bins sum q instead of counting
entries; the first bin from the top whose running sum reaches the remaining target
holds tau.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from sau_kernels import radix
from sau_kernels._common import check_fraction, check_layer, resolve_backend
from sau_kernels.selection import Selection


def _mass_key(layer: radix.Layer, share: float) -> int | None:
    """The key of tau (module docstring), or None when nothing is selected (Q == 0)."""
    scores = layer[0]
    max_score = float(scores.max()) if scores.numel() else 0.0
    if max_score == 0:  # every score zero: no mass to hold
        return None
    exponent = radix.fixed_point_exponent(max_score, scores.numel())
    histograms = radix.layer_histograms([layer], exponent=exponent)
    first = radix.first_digit_table(histograms, 1)
    target = math.ceil(Fraction(share) * int(first.sum()))
    (key,) = radix.threshold_keys(histograms, first, [target])
    return key


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
    Raises:
        TypeError: a wrong dtype. ValueError: share outside (0, 1], mismatched numel or
        device, a NaN, inf or negative score.
    """
    share = check_fraction("share", share)
    scores, weight = check_layer(scores, weight)
    layer = (scores, weight, resolve_backend(backend, scores, weight))
    n_survivors = int(torch.count_nonzero(weight))
    return radix.selection_at_key(layer, _mass_key(layer, share), n_survivors)
