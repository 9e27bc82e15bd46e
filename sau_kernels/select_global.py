"""One threshold over many layers (scope="global", as SalUn selects): exact radix select.

r = ceil(k * sum_l |S_l|) over the survivors of all layers together; tau = the r-th
largest survivor score among them; in every layer G_l = {i in S_l : s_i >= tau, s_i > 0}.
Each radix digit (select.py's 7 + 8 + 8 + 8 bits) is one histogram pass per layer into
that layer's row of a [layers, bins] table; the rows are summed on the host. No
concatenated copy of the scores is made. The rows are what an all-reduce would sum across
ranks, so a distributed version only adds that collective.
"""

from __future__ import annotations

import numpy as np
import torch

from sau_kernels import select as _sel
from sau_kernels._common import check_layer, num_selected, resolve_backend
from sau_kernels._threshold import (
    selection_at_key,
    torch_keys,
    torch_live,
)
from sau_kernels.selection import Selection


def _histograms_triton(layers, prefix, prefix_shift, bits, shift) -> np.ndarray:
    # select.py's histogram pass per layer, one row each (a [layers, bins] table).
    rows = [
        _sel.histogram_triton(scores, weight, prefix, prefix_shift, bits, shift)
        if scores.numel()
        else torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
        for scores, weight in layers
    ]
    return torch.stack(rows).cpu().numpy()


def _histograms_torch(layers, prefix, prefix_shift, bits, shift) -> np.ndarray:
    rows = []
    for scores, weight in layers:
        keys = torch_keys(scores)
        live = torch_live(keys, weight.reshape(-1) != 0, prefix, prefix_shift)
        digit = (keys[live] >> shift) & ((1 << bits) - 1)
        rows.append(torch.bincount(digit, minlength=1 << bits).cpu().numpy())
    return np.stack(rows).astype(np.int64)


def global_threshold_key(layers, k: float, backend: str) -> tuple[int | None, list[int]]:
    """The key of the r-th largest survivor score over all layers, and |S| per layer.

    Args:
        layers: list of (scores float32, weight) pairs, contiguous, same device.
        k: fraction in (0, 1]. backend: "triton" | "torch" (resolved).
    Returns:
        (tau_key or None when r == 0, [n_survivors per layer]).
    """
    histograms = _histograms_triton if backend == "triton" else _histograms_torch
    prefix, prefix_shift, rank = 0, 31, None
    per_layer = [0] * len(layers)
    for bits, shift in _sel._DIGITS:
        table = histograms(layers, prefix, prefix_shift, bits, shift)
        h = table.sum(0)  # the summed histogram over layers (one all-reduce if sharded)
        if rank is None:  # first digit: every survivor is counted once
            per_layer = [int(x) for x in table.sum(1)]
            rank = num_selected(k, int(h.sum()))
            if rank == 0:
                return None, per_layer
        digit, rank = _sel._find_digit(h, rank)
        prefix, prefix_shift = (prefix << bits) | digit, shift
    return prefix, per_layer


@torch.no_grad()
def select_global(scores_list, weights, k, *, backend=None) -> list[Selection]:
    """Top-k over the survivors of several layers together, one threshold for all.

    r = ceil(k * sum of |S_l|); tau = r-th largest survivor score over all layers; per
    layer G_l = {weight != 0, scores >= tau, scores > 0}. Ties at tau are all selected;
    zero-saliency entries never are (docs/method.md).

    Args:
        scores_list: sequence of float32 score tensors (finite, >= 0), one per layer.
        weights: sequence of weights (float32 | float16 | bfloat16), same numel as their
            scores; all tensors on one device.
        k: fraction in (0, 1].
        backend: "triton" | "torch" | None.
    Returns:
        list of Selection (one per layer, in order); every threshold is the global tau
        (+inf when nothing is selected); importances and counts are per layer.
    """
    scores_list, weights = list(scores_list), list(weights)
    if len(scores_list) != len(weights) or not scores_list:
        raise ValueError(
            f"scores_list and weights must be non-empty and of equal length, "
            f"got {len(scores_list)} and {len(weights)}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    layers = [check_layer(s, w) for s, w in zip(scores_list, weights)]
    devices = {s.device for s, _ in layers}
    if len(devices) > 1:
        raise ValueError(f"all layers must be on one device, got {sorted(map(str, devices))}")
    chosen = resolve_backend(backend, *[t for pair in layers for t in pair])
    tau_key, n_survivors = global_threshold_key(layers, float(k), chosen)
    return [
        selection_at_key(s, w, tau_key, n_s, chosen) for (s, w), n_s in zip(layers, n_survivors)
    ]
