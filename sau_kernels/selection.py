"""The result type of `select_topk`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """The selected set G of one weight tensor (docs/method.md).

    Attributes:
        index: 1-D int32 (int64 when weight.numel() >= 2**31), sorted ascending: flat
            indices into weight.view(-1) of G.
        threshold: 0-d float32 tau, the r-th largest survivor score (+inf when nothing
            is selected: r == 0 or every survivor has zero saliency).
        n_survivors: |S|, the number of entries with weight != 0.
        n_selected: |G| (>= r when scores tie at tau; < r when fewer than r survivors
            have non-zero saliency, which is never selected).
        importance_pruned: 0-d float64, I_P = sum of scores over pruned entries.
        importance_survivors: 0-d float64, I_S = sum over survivors.
        importance_selected: 0-d float64, I_G = sum over G.
        offset: flat position of the tensor's first entry in the full (logical) tensor:
            0 for a plain tensor; for the local shard of a dim-0 sharded tensor
            (sau_kernels.distributed) index + offset are global positions, while
            threshold, n_survivors, n_selected and the importances are the global
            values of the whole tensor (so n_selected may exceed index.numel()).
    """

    index: torch.Tensor
    threshold: torch.Tensor
    n_survivors: int
    n_selected: int
    importance_pruned: torch.Tensor
    importance_survivors: torch.Tensor
    importance_selected: torch.Tensor
    offset: int = 0
