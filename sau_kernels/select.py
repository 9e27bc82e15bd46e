"""Exact per-layer top-k selection over surviving weights.

The Triton path is the radix select of `sau_kernels.radix` over this one layer (a
histogram pass, a split pass that also prepares the emit, passes over the candidates
only, and a write from bit words: about two reads of scores and weight). The PyTorch path finds the
r-th largest survivor score with `torch.kthvalue` (O(n), no sort); for CPU tensors it
runs in numpy instead (`_select_cpu`). All give the sort-based definition bit for bit,
ties included, with no size cap.
"""

from __future__ import annotations

import numpy as np
import torch

from sau_kernels import radix
from sau_kernels._common import (
    check_fraction,
    check_layer,
    index_dtype,
    num_selected,
    resolve_backend,
)
from sau_kernels.selection import Selection


def _select_triton(scores: torch.Tensor, weight: torch.Tensor, k: float) -> Selection:
    # The scores are checked (finite, >= 0) by the first pass, not by a read of their own.
    (selection,) = radix.top_k([(scores, weight, "triton")], k, validate=True)
    return selection


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


def _survivor_mask(weight: torch.Tensor) -> np.ndarray:
    """weight != 0, flat, as a numpy bool array (a view of weight's memory is read)."""
    w = weight.detach().reshape(-1)
    if w.dtype == torch.float32:
        return w.numpy() != 0
    # float16 / bfloat16 (numpy has no bfloat16): non-zero iff a bit other than the sign
    # is set, so -0.0 is pruned and NaN survives, as with `weight != 0`.
    return (w.view(torch.int16).numpy() & 0x7FFF) != 0


def _sum64(values: np.ndarray) -> torch.Tensor:
    """0-d float64 torch sum of float32 `values`: bit for bit `tensor.sum(dtype=float64)`
    (which on the CPU converts to float64 first, then reduces in a thread-count-independent
    order), so the CPU path's importances equal the torch path's."""
    return torch.from_numpy(values.astype(np.float64)).sum()


def _rth_largest(values: np.ndarray, r: int) -> np.float32:
    """The r-th largest of float32 `values` (1 <= r <= values.size), by introselect."""
    rank = values.size - r  # its 0-based position in ascending order
    return np.partition(values, rank)[rank]


def _select_cpu(scores: torch.Tensor, weight: torch.Tensor, k: float) -> Selection:
    """`_select_torch` for CPU tensors, in numpy, with the same result bit for bit.

    numpy's compress, partition (introselect) and flatnonzero beat torch's boolean
    indexing, kthvalue and nonzero on the CPU by several times (docs/benchmarks.md,
    "Planning speed"); the float64 sums stay torch's, over the same values in the same
    order.
    """
    s = scores.detach().reshape(-1).numpy()
    survivors = _survivor_mask(weight)
    values = s[np.flatnonzero(survivors)]  # the survivors' scores, in position order
    n_survivors = values.size
    r = num_selected(k, n_survivors)
    tau = _rth_largest(values, r) if r else np.float32(np.inf)
    # Zero saliency is never selected; s > 0 replaces s >= 0 when tau is 0 (reported as
    # +0.0, as the Triton path's keys give it, whichever zero the select returned).
    tau = np.float32(0) if tau == 0 else tau
    selected = survivors & ((s > 0) if tau == 0 else (s >= tau))
    index = np.flatnonzero(selected)
    index = index.astype(np.int32) if index_dtype(s.size) == torch.int32 else index
    f64 = torch.float64
    importance_survivors = _sum64(values)
    if index.size == 0:
        tau, importance_selected = np.float32(np.inf), torch.zeros((), dtype=f64)
    elif tau == 0:  # every survivor is >= 0: _select_torch sums them all, as I_S
        importance_selected = importance_survivors.clone()
    else:  # the survivors with s >= tau, in position order: exactly s[index]
        importance_selected = _sum64(s[index])
    if n_survivors == s.size:  # nothing pruned: I_P is exactly 0, skip a full pass
        importance_pruned = torch.zeros((), dtype=f64)
    else:
        # s * 0 where s survives (the zeros' signs cannot matter: a torch sum of zeros
        # is +0.0); 5x faster than np.where with a random mask.
        importance_pruned = _sum64(s * ~survivors)
    return Selection(
        index=torch.from_numpy(index),
        threshold=torch.tensor(float(tau), dtype=torch.float32),
        n_survivors=n_survivors,
        n_selected=int(index.size),
        importance_pruned=importance_pruned,
        importance_survivors=importance_survivors,
        importance_selected=importance_selected,
    )


@torch.no_grad()  # reads scores and weight only; the Selection is never differentiated
def select_topk(scores, weight, k, *, backend=None) -> Selection:
    """Select the top-k fraction of surviving weights by score, exactly, ties included.

    r = ceil(k * |S|) over survivors S = {weight != 0}; tau = the r-th largest survivor
    score; G = {i in S : scores_i >= tau and scores_i > 0}: a zero-saliency entry is
    never selected, so |G| may be below r, and an all-zero layer selects nothing
    (threshold +inf).

    Args:
        scores: float32, finite, >= 0; same numel and device as weight (any shape).
        weight: float32 | float16 | bfloat16 pruned weight (pruned entries are exact 0).
        k: float in (0, 1].
        backend: "triton" | "torch" | None.
    Returns:
        Selection with index (1-D, sorted, int32 below 2**31 elements), threshold (0-d
        float32 tau; +inf when nothing is selected), n_survivors, n_selected, and
        float64 importances I_P, I_S, I_G.
    Raises:
        TypeError: a wrong dtype. ValueError: k outside (0, 1], mismatched numel or
        device, a NaN, inf or negative score.
    """
    checked = check_layer(scores, weight, scan_scores=False)
    k = check_fraction("k", k)
    if resolve_backend(backend, scores, weight) == "triton" and scores.numel():
        return _select_triton(*checked, k)
    scores, weight = check_layer(*checked)  # with the scan of the scores
    if scores.device.type == "cpu":
        return _select_cpu(scores, weight, k)
    return _select_torch(scores, weight, k)
