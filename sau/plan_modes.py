"""The selection options of `plan_selection` beyond per-layer top-k (issue 15).

- k="mass:m": per layer, the fewest survivors holding a share m of the layer's survivor
  score (`sau_kernels.select_mass`), instead of a fixed fraction.
- scope="global": one threshold over all planned weights together (as SalUn selects;
  `sau_kernels.select_global`), so layers with more salient weights select more.
- score="contrast": select by F_forget / (F_retain + lambda mean F_retain) (Selective
  Synaptic Dampening's ratio, `sau.saliency.contrast_score`); the importances I_P, I_S,
  I_G, the amplification w and the per-entry scales still come from the forget saliency.
- per-entry update scales for amplify="saliency": c_i = clamp(s_i / mean_G s, 1/w_max,
  w_max) as uint8 codes (`sau_kernels.encode_entry_scale`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sau_kernels import (
    Selection,
    encode_entry_scale,
    select_global,
    select_mass,
    select_topk,
)

SCORES = ("forget", "contrast")
SCOPES = ("layer", "global")


def parse_k(k) -> tuple[str, float]:
    """("fraction", k) for k in (0, 1], ("mass", m) for the string "mass:m", m in (0, 1].

    Raises ValueError naming the accepted forms for anything else.
    """
    if isinstance(k, str):
        head, _, tail = k.partition(":")
        try:
            share = float(tail)
        except ValueError:
            share = math.nan
        if head.strip() == "mass" and 0 < share <= 1:
            return "mass", share
        raise ValueError(f'k must be a fraction in (0, 1] or "mass:m" with m in (0, 1], got {k!r}')
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f'k must be a fraction in (0, 1] or "mass:m" with m in (0, 1], got {k!r}')
    return "fraction", float(k)


def check_options(kind: str, score: str, scope: str) -> None:
    """ValueError for an unknown score or scope, or mass-based k with a global scope."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if kind == "mass" and scope == "global":
        raise ValueError('k="mass:m" selects per layer; it cannot be combined with scope="global"')


def select_with_options(chosen, saliency, kind, value, score, scope, backend) -> list:
    """One Selection per chosen layer under the options (plain tensors only).

    Args:
        chosen: {name: (param, float32 forget saliency on its device)}, in plan order.
        saliency: the Saliency (for score="contrast").
        kind, value: parse_k's result. score, scope: as plan_selection.
    """

    def scores_of(name: str, forget: torch.Tensor) -> torch.Tensor:
        # The contrast score is made per layer when needed, not kept for every layer.
        return saliency.score(name).to(forget.device) if score == "contrast" else forget

    if scope == "global":
        names = list(chosen)
        scores = [scores_of(n, chosen[n][1]) for n in names]
        weights = [chosen[n][0].detach() for n in names]
        return select_global(scores, weights, value, backend=backend)
    out = []
    for name, (param, forget) in chosen.items():
        s, w = scores_of(name, forget), param.detach()
        if kind == "mass":
            out.append(select_mass(s, w, value, backend=backend))
        else:
            out.append(select_topk(s, w, value, backend=backend))
    return out


def with_forget_importances(sel: Selection, forget: torch.Tensor, weight) -> Selection:
    """`sel` with I_P, I_S, I_G summed over the forget saliency (for score="contrast")."""
    s = forget.reshape(-1).double()
    survivors = weight.reshape(-1) != 0
    return dataclasses.replace(
        sel,
        importance_pruned=torch.where(survivors, 0.0, s).sum(),
        importance_survivors=torch.where(survivors, s, 0.0).sum(),
        importance_selected=s[sel.index.long()].sum(),
    )


def entry_scale_codes(sel: Selection, forget: torch.Tensor, w_max: float) -> torch.Tensor:
    """uint8 codes of c_i = clamp(s_i / mean_{j in G} s_j, 1/w_max, w_max) over G.

    sel's importances must be forget-saliency sums (mean = I_G / |G|).
    """
    mean = float(sel.importance_selected) / sel.n_selected if sel.n_selected else 0.0
    selected = forget.reshape(-1)[sel.index.long()].float()
    return encode_entry_scale(selected, mean, w_max)
