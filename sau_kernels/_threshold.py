"""Shared pieces of the threshold-based selection modes (select_global, select_mass).

Both find a 31-bit key threshold by radix select (select.py's digit schedule) and then
emit G = {i in S : key_i >= tau_key and s_i > 0} with select.py's count and write passes.
Keys are the float32 bit patterns of the scores with the sign bit cleared: for finite
scores >= 0 they order exactly like the scores (select.py's module docstring).

Zero-saliency rule (docs/method.md): an entry with s_i == 0 is never selected. Key 0
is exactly s == 0 (and -0.0), so the rule is applied by raising the key threshold to 1.
"""

from __future__ import annotations

import numpy as np
import torch

from sau_kernels import select as _sel
from sau_kernels._common import (
    index_dtype,
)
from sau_kernels.selection import Selection

NO_SELECTION_KEY = 1 << 31  # larger than any 31-bit key: selects nothing


def torch_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 order-preserving keys of float32 scores >= 0 (sign bit cleared)."""
    return scores.reshape(-1).view(torch.int32) & 0x7FFFFFFF


def torch_live(keys, survivors, prefix: int, prefix_shift: int) -> torch.Tensor:
    """Survivors whose key agrees with the digits fixed so far."""
    return survivors & ((keys >> prefix_shift) == prefix)


def key_to_float(key: int) -> float:
    """The float32 value whose bit pattern is `key` (a 31-bit key)."""
    return float(np.array([key], dtype=np.uint32).view(np.float32)[0])


def selection_at_key(scores, weight, tau_key: int | None, n_survivors: int, backend: str):
    """G = {survivors with key >= max(tau_key, 1)} as a Selection; tau_key None: nothing.

    Args:
        scores: float32, contiguous; weight: same numel, contiguous.
        tau_key: the threshold's 31-bit key, or None when nothing is to be selected.
        n_survivors: |S| of this layer (reported as is).
        backend: "triton" | "torch" (already resolved).
    Returns:
        Selection whose threshold is the float of tau_key (+inf when G is empty).
    """
    device = scores.device
    if tau_key is None:
        threshold = torch.tensor(float("inf"), dtype=torch.float32, device=device)
        key = NO_SELECTION_KEY
    else:
        threshold = torch.tensor(key_to_float(tau_key), dtype=torch.float32, device=device)
        key = max(tau_key, 1)  # the zero-saliency rule
    n = scores.numel()
    if backend == "triton" and n:
        return _at_key_triton(scores, weight, key, threshold, n_survivors)
    s = scores.view(-1)
    survivors = weight.view(-1) != 0
    if tau_key is None:  # 2**31 does not fit an int32 compare: select nothing directly
        selected = torch.zeros_like(survivors)
    else:
        selected = survivors & (torch_keys(scores) >= key)
    index = torch.nonzero(selected).view(-1).to(index_dtype(n))
    if index.numel() == 0:  # as select_topk: +inf whenever G is empty
        threshold = torch.tensor(float("inf"), dtype=torch.float32, device=device)
    f64 = torch.float64
    return Selection(
        index=index,
        threshold=threshold,
        n_survivors=n_survivors,
        n_selected=index.numel(),
        importance_pruned=torch.where(survivors, 0.0, s).sum(dtype=f64),
        importance_survivors=torch.where(survivors, s, 0.0).sum(dtype=f64),
        importance_selected=torch.where(selected, s, 0.0).sum(dtype=f64),
    )


def _at_key_triton(scores, weight, key: int, threshold, n_survivors: int) -> Selection:
    # select.py's counting and writing passes: they take any key threshold.
    index, sums = _sel.emit_triton(scores, weight, key)
    if index.numel() == 0:  # as select_topk: +inf whenever G is empty
        threshold = torch.tensor(float("inf"), dtype=torch.float32, device=scores.device)
    i_p, i_s, i_g = sums.unbind()
    return Selection(index, threshold, n_survivors, index.numel(), i_p, i_s, i_g)
