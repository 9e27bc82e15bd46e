"""Does an unlearning update survive 4-bit quantization, and an update made to survive it.

Measures (docs/method.md, "Durability of an update"): for the entries an unlearning run
moved (``w_after != w_before``, pruned entries excluded), ``|dw| / bin``, where bin is the
width of the quantization cell the starting weight lies in:

- "rtn4": 4-bit RTN, group 128 (sau.lab.quantize.quantize_dequantize): the group's scale
  (one quantization step), from the starting weights;
- "nf4": NF4, block 64 (sau.lab.quantize.nf4_quantize_dequantize): ``absmax`` of the
  starting weight's block times the width of its code's decision cell, i.e. for code
  index i of NF4_CODE c: ``(c[i+1] - c[i-1]) / 2`` for 0 < i < 15, ``c[1] - c[0]`` and
  ``c[15] - c[14]`` at the ends;

and whether the update survives: the entry's quantization level (RTN's integer q, NF4's
code index) in the unlearned model differs from its level in the starting model (each
model quantized as a whole, with its own scales). A level, not the dequantized value:
when a group's / block's max moves, its scale changes and every dequantized value of the
group changes with it, even where the level, and so the forgetting, did not move
(``qdiff_{q}``, the share whose dequantized value differs, is reported beside it).

`make_durable_` is the post-step of the "sau-durable" variant: each selected entry whose
quantized value did not change is set to the next NF4 level in the direction of its
update (``c[i +- 1] * absmax`` of the unlearned block), so it changes code by construction
(a block's max entry is left alone: moving it would rescale the block).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from sau.lab.quantize import NF4_CODE, nf4_codes, nf4_quantize_dequantize, quantize_dequantize

__all__ = ["QUANTIZERS", "bin_width", "durability_stats", "durable_step_", "make_durable_"]

QUANTIZERS = ("rtn4", "nf4")
_RTN_GROUP = 128


def _nf4_cell_width() -> torch.Tensor:
    c = torch.tensor(NF4_CODE, dtype=torch.float32)
    w = torch.empty(16)
    w[1:-1] = (c[2:] - c[:-2]) / 2
    w[0], w[-1] = c[1] - c[0], c[-1] - c[-2]
    return w


def bin_width(weight: torch.Tensor, quantizer: str) -> torch.Tensor:
    """Per-entry bin width of `quantizer` at `weight` (see module docstring).

    Args:
        weight: 2-D [out, in] float tensor (the starting weight).
        quantizer: one of QUANTIZERS.

    Returns:
        float32, same shape as `weight` (0 in an all-zero group / block).
    """
    w = weight.detach().float()
    if quantizer == "rtn4":
        rows, cols = w.shape
        pad = (-cols) % _RTN_GROUP
        g = torch.nn.functional.pad(w, (0, pad)).view(rows, -1, _RTN_GROUP)
        scale = (g.abs().amax(dim=-1, keepdim=True) / 7.0).to(torch.bfloat16).float()
        return scale.expand_as(g).reshape(rows, -1)[:, :cols].contiguous()
    if quantizer == "nf4":
        idx, absmax = nf4_codes(w)
        width = _nf4_cell_width().to(w.device)[idx] * absmax
        return width.reshape(-1)[: w.numel()].view(w.shape)
    raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")


def _levels(weight: torch.Tensor, quantizer: str) -> torch.Tensor:
    """Per-entry quantization level, same shape: RTN-4's q in -7..7, NF4's code 0..15."""
    w = weight.detach().float()
    if quantizer == "nf4":
        idx, _ = nf4_codes(w)
        return idx.reshape(-1)[: w.numel()].view(w.shape)
    scale = bin_width(w, "rtn4")
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / safe), -7, 7).long()


def _quantize(weight: torch.Tensor, quantizer: str) -> torch.Tensor:
    if quantizer == "rtn4":
        return quantize_dequantize(weight.float(), 4, group_size=_RTN_GROUP)
    return nf4_quantize_dequantize(weight.float())


def durability_stats(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    names: Iterable[str] | None = None,
) -> dict:
    """Durability columns of one unlearning run (module docstring).

    Args:
        before, after: name -> 2-D weight of the starting and the unlearned model.
        names: the weights to measure (default all of `before`). Pruned entries (zero in
            `before` and in `after`) never count as moved.

    Returns:
        {"moved": number of moved entries} and, per quantizer q in QUANTIZERS,
        ``dw_bin_{q}_p10 / _p50 / _p90`` (percentiles of |dw| / bin over moved entries
        with a non-zero bin), ``survive_{q}`` (share of moved entries whose quantization
        level changed) and ``qdiff_{q}`` (share whose dequantized value changed); None
        where nothing moved.
    """
    names = list(before) if names is None else list(names)
    ratios: dict[str, list] = {q: [] for q in QUANTIZERS}
    survived = dict.fromkeys(QUANTIZERS, 0)
    differs = dict.fromkeys(QUANTIZERS, 0)
    moved_n = 0
    for n in names:
        b, a = before[n].detach().float(), after[n].detach().float()
        moved = a != b
        moved_n += int(moved.sum())
        dw = (a - b).abs()[moved]
        for q in QUANTIZERS:
            bins = bin_width(b, q)[moved]
            ok = bins > 0
            ratios[q].append((dw[ok] / bins[ok]).numpy())
            survived[q] += int((_levels(a, q) != _levels(b, q))[moved].sum())
            differs[q] += int((_quantize(a, q) != _quantize(b, q))[moved].sum())
    out: dict = {"moved": moved_n}
    for q in QUANTIZERS:
        r = np.concatenate(ratios[q]) if ratios[q] else np.empty(0)
        for p in (10, 50, 90):
            out[f"dw_bin_{q}_p{p}"] = float(np.percentile(r, p)) if r.size else None
        out[f"survive_{q}"] = survived[q] / moved_n if moved_n else None
        out[f"qdiff_{q}"] = differs[q] / moved_n if moved_n else None
    return out


def make_durable_(
    after: Mapping[str, torch.nn.Parameter],
    before: Mapping[str, torch.Tensor],
    selected: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Push each selected, moved entry whose NF4 level (code index) did not change to the
    next NF4 level in the direction of its update (in place).

    Args:
        after: name -> parameter of the unlearned model (changed in place).
        before: name -> the starting weight (same shapes).
        selected: name -> flat int indices of the entries that may be pushed (SAU's G);
            None: every moved entry. Names missing from it are left alone.

    Returns:
        The number of entries pushed. Zeros of `before` that did not move stay zero
        (pruned weights), and no pushed value exceeds its block's absmax, so the other
        entries of the block keep their NF4 values.
    """
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    pushed = 0
    with torch.no_grad():
        for n, p in after.items():
            if selected is not None and n not in selected:
                continue
            a, b = p.detach().float().reshape(-1), before[n].detach().float().reshape(-1)
            mask = a != b
            if selected is not None:
                keep = torch.zeros_like(mask)
                keep[selected[n].long()] = True
                mask &= keep
            idx_b, _ = nf4_codes(b)
            idx_a, absmax_a = nf4_codes(a)
            level = idx_b.reshape(-1)[: a.numel()]
            same = idx_a.reshape(-1)[: a.numel()] == level  # NF4 level unchanged
            # The next level in the update's direction, on the unlearned block's scale
            # (no pushed value exceeds that absmax, so the block's scale is kept).
            target = (level + torch.sign(a - b).long()).clamp(0, 15)
            scale = absmax_a.expand(idx_b.shape).reshape(-1)[: a.numel()]
            # A block's max entry is left alone: moving it would change the block's scale.
            go = mask & same & (target != level) & (a.abs() < scale)
            new = torch.where(go, code[target] * scale, a)
            p.copy_(new.view(p.shape).to(p.dtype))
            pushed += int(go.sum())
    return pushed


def durable_step_(model: torch.nn.Module, start: torch.nn.Module, names, plan) -> int:
    """The "sau-durable" post-step on an unlearned model: `make_durable_` over the
    weights `names`, restricted to the plan's selected sets (every moved entry when
    `plan` is None). Returns the number of entries pushed.

    Args:
        model: the unlearned model (changed in place); start: its starting model (same
            architecture); names: 2-D weight names; plan: a SelectionPlan bound to
            `model` (name -> LayerPlan with `.selection.index`), or None.
    """
    after = {n: model.get_parameter(n) for n in names}
    before = {n: start.get_parameter(n).detach() for n in names}
    sel = None if plan is None else {n: plan[n].selection.index for n in plan if n in after}
    return make_durable_(after, before, sel)
