"""Per-layer selection plan: which survivors each weight updates, and by how much.

For every scored weight: G = the top-k fraction of its survivors by saliency (exact,
ties included, `sau_kernels.select_topk`) and one amplification scalar
w = min(1 + alpha * I_P / I_G, w_max), w = 1 when I_G == 0 (DESIGN.md section 1).
The plan is what `SAUAdamW(plan=...)` consumes; its stats table is what reports show.

A 3-D parameter is a fused experts tensor [experts, ...] (`sau.weights`): every expert
slice param[e] is a layer of its own, with its own r, tau, I_P, I_S, I_G and w. Its
LayerPlan stores ONE index over the flat parameter, the concatenation of the experts'
selections in expert order (so still sorted), and per-expert `ExpertPlan`s whose
`selection.index` is that expert's segment of it (a view: global flat positions into
param.view(-1), expert e owning [e * n_e, (e + 1) * n_e)). The step runs the masked AdamW
once per segment with that expert's w. The stats table has one row per expert,
"name[e]".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch
from torch.distributed.tensor import DTensor

from sau._dtensor import local
from sau.plan_modes import (
    check_options,
    entry_scale_codes,
    parse_k,
    select_with_options,
    with_forget_importances,
)
from sau.plan_types import ExpertPlan, LayerPlan, SelectionPlan, amplification
from sau_kernels import Selection, select_topk
from sau_kernels._common import index_dtype
from sau_kernels.distributed import select_topk_many

__all__ = ["ExpertPlan", "LayerPlan", "SelectionPlan", "amplification", "plan_selection"]


def _check_settings(k, alpha, w_max) -> None:
    def real(x) -> bool:
        return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)

    parse_k(k)  # a fraction in (0, 1] or "mass:m"
    if not real(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if not real(w_max) or w_max < 1:
        raise ValueError(f"w_max must be a finite number >= 1, got {w_max!r}")


def _select(chosen: dict, k: float, backend) -> list[Selection]:
    """One Selection per chosen layer. FSDP2 (DTensor) weights are selected over their
    whole logical tensor by sau_kernels.distributed, all layers in one batch of
    collectives; plain tensors by select_topk, one at a time."""
    pairs = list(chosen.values())
    if any(isinstance(p, DTensor) for p, _ in pairs):
        return select_topk_many(
            [s for _, s in pairs], [p.detach() for p, _ in pairs], k, backend=backend
        )
    return [select_topk(s, p.detach(), k, backend=backend) for p, s in pairs]


def _local_scores(forget, param, selection: Selection) -> torch.Tensor:
    """The forget saliency of this rank's shard, flat, aligned with selection.index (local
    indices): a DTensor's local part, or the slice of a full plain saliency at the shard's
    offset (FSDP2); a plain param's saliency as is."""
    if isinstance(forget, DTensor) or not isinstance(param, DTensor):
        return local(forget).reshape(-1)
    n = local(param).numel()
    return forget.reshape(-1)[selection.offset : selection.offset + n]


def _layer_w(selection: Selection, alpha: float, w_max: float) -> float:
    return amplification(
        float(selection.importance_pruned),
        float(selection.importance_selected),
        float(alpha),
        float(w_max),
    )


def _plan_experts(param, scores, k, alpha, w_max, backend) -> LayerPlan:
    """Per-expert selections of a fused experts tensor [E, ...], merged into one index."""
    n_e = param[0].numel() if param.shape[0] else 0
    dtype = index_dtype(param.numel())
    weight = param.detach()
    local = [select_topk(scores[e], weight[e], k, backend=backend) for e in range(param.shape[0])]
    # Offsets in int64 before narrowing: e * n_e may pass 2**31 in a big MoE tensor.
    parts = [sel.index.long() + e * n_e for e, sel in enumerate(local)]
    empty = torch.zeros(0, dtype=torch.int64, device=param.device)
    index = (torch.cat(parts) if parts else empty).to(dtype)
    experts, start = [], 0
    for sel in local:
        stop = start + sel.n_selected
        seg = dataclasses.replace(sel, index=index[start:stop])  # a view of the merged index
        experts.append(ExpertPlan(seg, _layer_w(sel, alpha, w_max), n_e))
        start = stop

    def total(field: str) -> torch.Tensor:  # float64 sum over experts, fixed order
        values = [getattr(sel, field) for sel in local]
        if not values:
            return torch.zeros((), dtype=torch.float64, device=param.device)
        return torch.stack(values).sum()

    taus = [float(sel.threshold) for sel in local if sel.n_selected]
    merged = Selection(
        index=index,
        threshold=torch.tensor(
            min(taus, default=math.inf), dtype=torch.float32, device=param.device
        ),
        n_survivors=sum(sel.n_survivors for sel in local),
        n_selected=int(index.numel()),
        importance_pruned=total("importance_pruned"),
        importance_survivors=total("importance_survivors"),
        importance_selected=total("importance_selected"),
    )
    # amplify="saliency": c_i relative to each expert's own mean saliency over its G.
    codes = [entry_scale_codes(sel, scores[e], w_max) for e, sel in enumerate(local)]
    entry_scale = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.uint8)
    w_top = max((ex.amplification for ex in experts), default=1.0)
    return LayerPlan(
        param=param,
        selection=merged,
        amplification=w_top,
        entry_scale=entry_scale.to(param.device),
        experts=tuple(experts),
    )


def plan_selection(
    named_params: Iterable[tuple[str, torch.Tensor]],
    saliency: Mapping[str, torch.Tensor],
    *,
    k: float = 0.3,
    alpha: float = 0.1,
    w_max: float = 10.0,
    backend: str | None = None,
    score: str = "forget",
    scope: str = "layer",
) -> SelectionPlan:
    """Select G per layer and compute its amplification (DESIGN.md section 1).

    Args:
        named_params: (name, parameter) pairs, e.g. model.named_parameters(). Only names
            present in `saliency` are planned; the others are ignored. A 3-D parameter
            is a fused experts tensor: one selection and w per expert (module docstring).
        saliency: {name: float saliency shaped like the parameter} (compute_saliency's
            output); finite and >= 0. Moved to the parameter's device as float32.
        k: fraction of each layer's survivors to select, in (0, 1]; or "mass:m": per
            layer the fewest survivors holding a share m of their score
            (sau_kernels.select_mass; ties at the boundary are all selected).
        alpha: redistribution strength, >= 0 (0 gives w = 1 everywhere).
        w_max: cap on w, >= 1.
        backend: kernel backend for select_topk ("triton" | "torch" | None).
        score: "forget" selects by the saliency itself; "contrast" by
            F_forget / (F_retain + lambda mean F_retain) (needs a Saliency computed with
            retain_batches). tau is then in score units; I_P, I_S, I_G, w and the
            per-entry scales always come from the forget saliency.
        scope: "layer" (a threshold per layer) or "global" (one threshold over all
            planned weights, sau_kernels.select_global; the importances stay per layer).

    FSDP2: for a DTensor parameter (sharded on dim 0) with a DTensor saliency sharded
    alike, or the full plain saliency, G is selected over the whole logical tensor
    (exact, independent of the number of ranks; DESIGN.md section 5). Its Selection then
    holds this rank's local indices and offset and the global stats, identical on every
    rank; every rank must call plan_selection with the same layers (it is collective).

    Returns:
        SelectionPlan: name -> LayerPlan(param, selection, amplification), in the order of
        named_params.

    Raises:
        ValueError: bad k/alpha/w_max/score/scope, a saliency shape that differs from its
            parameter, saliency names that named_params does not contain, or
            score="contrast" without a retain Fisher.
    """
    _check_settings(k, alpha, w_max)
    kind, value = parse_k(k)
    check_options(kind, score, scope)
    _check_contrast(saliency, score)
    chosen_all = _gather(named_params, saliency)
    experts = _plan_fused(chosen_all, kind, value, score, scope, alpha, w_max, backend)
    chosen = {n: pair for n, pair in chosen_all.items() if n not in experts}
    selections = _select_all(chosen, saliency, kind, value, score, scope, backend)
    layers: dict[str, LayerPlan] = dict(experts)
    for name, selection in zip(chosen, selections):
        param, forget = chosen[name]
        layers[name] = _layer_plan(param, forget, selection, score, alpha, w_max)
    layers = {name: layers[name] for name in chosen_all}  # in the order of named_params
    _check_all_planned(saliency, layers)
    return SelectionPlan(layers, k=k, alpha=alpha, w_max=w_max, score=score, scope=scope)


def _check_contrast(saliency, score: str) -> None:
    if score == "contrast" and getattr(saliency, "retain", None) is None:
        raise ValueError(
            'score="contrast" needs a Saliency with a retain Fisher: '
            "compute_saliency(..., retain_batches=..., contrast=lambda)"
        )


def _gather(named_params, saliency) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (param, float32 scores on the param's device)} for the names in saliency."""
    chosen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, param in named_params:
        if name not in saliency or name in chosen:
            continue
        scores = saliency[name]
        if tuple(scores.shape) != tuple(param.shape):
            raise ValueError(
                f"saliency[{name!r}] has shape {tuple(scores.shape)} but the parameter has "
                f"shape {tuple(param.shape)}"
            )
        chosen[name] = (param, scores.detach().to(device=param.device, dtype=torch.float32))
    return chosen


def _plan_fused(chosen, kind, value, score, scope, alpha, w_max, backend) -> dict:
    """{name: LayerPlan} of the 3-D (fused experts) parameters, planned expert by expert."""
    fused = [n for n, (p, _) in chosen.items() if p.dim() == 3 and not isinstance(p, DTensor)]
    if fused and (kind, score, scope) != ("fraction", "forget", "layer"):
        raise ValueError(
            f"fused experts tensors ({fused[0]!r}) are planned per expert only "
            'with k=<fraction>, score="forget", scope="layer"'
        )
    return {n: _plan_experts(*chosen[n], value, alpha, w_max, backend) for n in fused}


def _select_all(chosen, saliency, kind, value, score, scope, backend) -> list:
    """One Selection per chosen layer, in order: per-layer top-k or the option paths."""
    if (kind, score, scope) == ("fraction", "forget", "layer"):
        return _select(chosen, value, backend)
    if any(isinstance(p, DTensor) for p, _ in chosen.values()):
        raise ValueError(
            "score/scope/mass options are not supported for FSDP2 (DTensor) parameters "
            'yet; use k=<fraction>, score="forget", scope="layer"'
        )
    return select_with_options(chosen, saliency, kind, value, score, scope, backend)


def _layer_plan(param, forget, selection, score, alpha, w_max) -> LayerPlan:
    """A layer's w and per-entry scales from its selection and forget saliency."""
    if score == "contrast":
        selection = with_forget_importances(selection, forget, param.detach())
    w = amplification(
        float(selection.importance_pruned),
        float(selection.importance_selected),
        float(alpha),
        float(w_max),
    )
    codes = entry_scale_codes(selection, _local_scores(forget, param, selection), w_max)
    return LayerPlan(param, selection, w, codes)


def _check_all_planned(saliency, layers) -> None:
    missing = [name for name in saliency if name not in layers]
    if missing:
        raise ValueError(
            f"saliency has {len(missing)} names that named_params lacks, e.g. {missing[:3]}; "
            "pass the same model's named_parameters()"
        )
