"""One threshold over many layers (scope="global", as SalUn selects): exact radix select.

r = ceil(k * sum_l |S_l|) over the survivors of all layers together; tau = the r-th
largest survivor score among them; in every layer G_l = {i in S_l : s_i >= tau, s_i > 0}.
`radix.top_k` runs one search over all layers: each pass is one launch per layer and one
host sync for all, its histograms summed over the layers on the host; no concatenated
copy of the scores is made.
"""

from __future__ import annotations

import torch

from sau_kernels import radix
from sau_kernels._common import check_fraction, check_layer, resolve_backend
from sau_kernels.selection import Selection


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
    Raises:
        TypeError: a wrong dtype. ValueError: empty or unequal lists, k outside (0, 1],
        a layer's mismatched numel or bad scores, layers on several devices.
    """
    scores_list, weights = list(scores_list), list(weights)
    if len(scores_list) != len(weights) or not scores_list:
        raise ValueError(
            f"scores_list and weights must be non-empty and of equal length, "
            f"got {len(scores_list)} and {len(weights)}"
        )
    k = check_fraction("k", k)
    # the scores' values (finite, >= 0) are checked by the first selection pass
    pairs = [check_layer(s, w, scan_scores=False) for s, w in zip(scores_list, weights)]
    devices = {s.device for s, _ in pairs}
    if len(devices) > 1:
        raise ValueError(f"all layers must be on one device, got {sorted(map(str, devices))}")
    chosen = resolve_backend(backend, *[t for pair in pairs for t in pair])
    layers = [(s, w, chosen) for s, w in pairs]
    return radix.top_k(layers, k, validate=True)
