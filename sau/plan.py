"""Per-layer selection plan: which survivors each weight updates, and by how much.

For every scored weight: G = the top-k fraction of its survivors by saliency (exact,
ties included, `sau_kernels.select_topk`) and one amplification scalar
w = min(1 + alpha * I_P / I_G, w_max), w = 1 when I_G == 0 (docs/method.md). The plan is
what `SAUAdamW(plan=...)` consumes; its stats table is what reports show.

Options beyond per-layer top-k (`plan_selection` arguments):

- k="mass:m": per layer, the fewest survivors holding a share m of the layer's survivor
  score (`sau_kernels.select_mass`), instead of a fixed fraction.
- scope="global": one threshold over all planned weights together (as SalUn selects;
  `sau_kernels.select_global`), so layers with more salient weights select more.
- score="contrast": select by F_forget / (F_retain + lambda mean F_retain)
  (`sau.saliency.contrast_score`); I_P, I_S, I_G, w and the per-entry scales still come
  from the forget saliency.
- every plan also carries per-entry update scales for amplify="saliency":
  c_i = clamp(s_i / mean_G s, 1/w_max, w_max) as uint8 codes
  (`sau_kernels.encode_entry_scale`).

A 3-D parameter is a fused experts tensor [experts, ...] (`sau.weights`): every expert
slice param[e] is a layer of its own, with its own r, tau, I_P, I_S, I_G and w. Its
LayerPlan stores ONE index over the flat parameter, the concatenation of the experts'
selections in expert order (so still sorted), and per-expert `ExpertPlan`s whose
`selection.index` is that expert's segment of it (a view: global flat positions into
param.view(-1), expert e owning [e * n_e, (e + 1) * n_e)). `LayerPlan.segments()` names
those slices of the index (`Segment`); the step runs the masked AdamW once per segment
with its w. The stats table has one row per expert, "name[e]".
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor

from sau.distributed import local
from sau.names import SCOPES, SCORES
from sau.settings import FRACTION, INF, NON_NEGATIVE, check_number, is_number
from sau_kernels import (
    Selection,
    encode_entry_scale,
    select_global,
    select_mass,
    select_topk,
)
from sau_kernels._common import index_dtype
from sau_kernels.distributed import select_topk_many

__all__ = [
    "ExpertPlan",
    "LayerPlan",
    "Segment",
    "SelectionPlan",
    "amplification",
    "plan_selection",
]


def amplification(
    importance_pruned: float, importance_selected: float, alpha: float, w_max: float
) -> float:
    """w = min(1 + alpha * I_P / I_G, w_max); 1 when I_G == 0 (nothing to amplify)."""
    if importance_selected == 0:
        return 1.0
    return min(1.0 + alpha * importance_pruned / importance_selected, w_max)


class Segment(NamedTuple):
    """A slice of a LayerPlan's selection index that steps with one amplification: the
    whole index for a matrix, one expert's part of it for a fused experts tensor.

    Attributes:
        start, stop: the slice selection.index[start:stop] (positions in the index).
        amplification: its w, a float.
    """

    start: int
    stop: int
    amplification: float


def _stats_row(name: str, numel: int, sel: Selection, w: float) -> dict:
    return {
        "name": name,
        "numel": numel,
        # Fraction of exact zeros in the weight (pruned entries).
        "sparsity": (numel - sel.n_survivors) / numel if numel else 0.0,
        "n_selected": sel.n_selected,
        "tau": float(sel.threshold),
        "I_P": float(sel.importance_pruned),
        "I_S": float(sel.importance_survivors),
        "I_G": float(sel.importance_selected),
        "w": float(w),
    }


@dataclass(frozen=True)
class ExpertPlan:
    """The plan of one expert of a fused experts tensor.

    Attributes:
        selection: the expert's Selection; its index is the expert's segment of the
            LayerPlan's index (global flat positions into param.view(-1)); threshold,
            counts and importances are the expert's own.
        amplification: the expert's w.
        numel: entries of the expert's slice.
    """

    selection: Selection
    amplification: float
    numel: int


@dataclass(frozen=True)
class LayerPlan:
    """The plan of one weight tensor.

    Attributes:
        param: the parameter itself (SAUAdamW matches plans to params by identity).
        selection: its Selection (index: 1-D int32 flat indices of G, sorted; threshold
            tau; importances I_P, I_S, I_G as 0-d float64 tensors). For a fused experts
            tensor: the union of the experts' selections (counts and importances summed,
            threshold the lowest expert tau).
        amplification: w >= 1, a Python float (for experts: the largest expert w; the
            step uses each expert's own).
        entry_scale: uint8 codes (one per entry of G) of the per-entry update scales
            c_i = clamp(s_i / mean_G s, 1/w_max, w_max) that SAUAdamW(amplify="saliency")
            applies; None for plans made by hand.
        experts: per-expert plans of a fused experts tensor, in expert order; () else.
    """

    param: torch.nn.Parameter
    selection: Selection
    amplification: float
    entry_scale: torch.Tensor | None = None
    experts: tuple[ExpertPlan, ...] = ()

    def segments(self) -> tuple[Segment, ...]:
        """The slices of selection.index the step treats alike: one for a matrix, one
        per expert (in expert order, each with the expert's w)."""
        if not self.experts:
            return (Segment(0, self.selection.n_selected, float(self.amplification)),)
        out, start = [], 0
        for expert in self.experts:
            stop = start + expert.selection.n_selected
            out.append(Segment(start, stop, float(expert.amplification)))
            start = stop
        return tuple(out)

    def stats_rows(self, name: str) -> list[dict]:
        """`stats` for a matrix; one row per expert, named "name[e]", for experts."""
        if not self.experts:
            return [self.stats(name)]
        return [
            _stats_row(f"{name}[{e}]", ex.numel, ex.selection, ex.amplification)
            for e, ex in enumerate(self.experts)
        ]

    def stats(self, name: str) -> dict:
        """One stats row: name, numel, sparsity, n_selected, tau, I_P, I_S, I_G, w."""
        return _stats_row(name, self.param.numel(), self.selection, self.amplification)


class SelectionPlan(Mapping):
    """A read-only Mapping name -> LayerPlan, in planning order, plus its stats table.

    Attributes:
        k, alpha, w_max, score, scope: the settings the plan was made with (k is a float,
            or the string "mass:m").
    """

    def __init__(
        self,
        layers: Mapping[str, LayerPlan],
        *,
        k: float | str,
        alpha: float,
        w_max: float,
        score: str = "forget",
        scope: str = "layer",
    ) -> None:
        self._layers = dict(layers)
        self.k = k if isinstance(k, str) else float(k)
        self.alpha, self.w_max = float(alpha), float(w_max)
        self.score, self.scope = score, scope

    def __getitem__(self, name: str) -> LayerPlan:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return (
            f"SelectionPlan({len(self)} layers, k={self.k}, alpha={self.alpha}, w_max={self.w_max})"
        )

    def bound_to(self, params: Mapping[str, torch.nn.Parameter]) -> SelectionPlan:
        """The same plan for another copy of the model: each layer's selection, scales
        and amplification unchanged, its `param` replaced by params[name] (same shape).

        Lets several optimizers over deep copies of one model share a plan computed once
        (SAUAdamW matches a plan's layers to its parameters by identity).

        Raises:
            ValueError: params[name] has another shape than the plan's parameter.
        """
        layers = {}
        for name, layer in self._layers.items():
            param = params[name]
            if param.shape != layer.param.shape:
                raise ValueError(
                    f"bound_to: {name} has shape {tuple(param.shape)}, the plan's "
                    f"{tuple(layer.param.shape)}"
                )
            layers[name] = dataclasses.replace(layer, param=param)
        return SelectionPlan(
            layers, k=self.k, alpha=self.alpha, w_max=self.w_max, score=self.score, scope=self.scope
        )

    def stats(self) -> list[dict]:
        """One dict per layer (per expert of a fused experts tensor, named "name[e]")
        with keys name, numel, sparsity, n_selected, tau (float, inf when nothing is
        selected), I_P, I_S, I_G, w."""
        return [row for name, layer in self._layers.items() for row in layer.stats_rows(name)]

    def totals(self) -> dict:
        """Sums over layers: numel, sparsity (overall fraction pruned), n_selected, I_*."""
        rows = self.stats()
        numel = sum(r["numel"] for r in rows)
        pruned = sum(r["numel"] * r["sparsity"] for r in rows)
        return {
            "name": "total",
            "numel": numel,
            "sparsity": pruned / numel if numel else 0.0,
            "n_selected": sum(r["n_selected"] for r in rows),
            "I_P": sum(r["I_P"] for r in rows),
            "I_S": sum(r["I_S"] for r in rows),
            "I_G": sum(r["I_G"] for r in rows),
        }

    def to_dict(self) -> dict:
        """JSON-ready dict: settings, per-layer rows and totals (tau inf -> None)."""

        def clean(row: dict) -> dict:
            # JSON has no Infinity: an empty selection's tau is written as null.
            return {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in row.items()
            }

        return {
            "k": self.k,
            "alpha": self.alpha,
            "w_max": self.w_max,
            "score": self.score,
            "scope": self.scope,
            "layers": [clean(r) for r in self.stats()],
            "totals": clean(self.totals()),
        }

    def to_json(self) -> str:
        """to_dict() as strict JSON text, indented by 2."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_text(self) -> str:
        """An aligned table, one row per layer and a totals row."""

        def fmt(row: dict) -> list[str]:
            def num(key: str) -> str:
                return f"{row[key]:.3e}" if key in row else "-"

            return [
                row["name"],
                str(row["numel"]),
                f"{row['sparsity']:.1%}",
                str(row["n_selected"]),
                num("tau"),
                num("I_P"),
                num("I_S"),
                num("I_G"),
                f"{row['w']:.4f}" if "w" in row else "-",
            ]

        header = ["layer", "numel", "sparsity", "|G|", "tau", "I_P", "I_S", "I_G", "w"]
        body = [fmt(r) for r in self.stats()]
        total = fmt(self.totals())
        widths = [max(len(r[i]) for r in [header, *body, total]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            # Names left-aligned, numbers right-aligned.
            parts = [cells[0].ljust(widths[0])]
            parts += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            return "  ".join(parts).rstrip()

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, body), rule, line(total)])


def plan_selection(
    named_params: Iterable[tuple[str, torch.Tensor]],
    saliency: Mapping[str, torch.Tensor],
    *,
    k: float | str = 0.3,
    alpha: float = 0.1,
    w_max: float = 10.0,
    backend: str | None = None,
    score: str = "forget",
    scope: str = "layer",
) -> SelectionPlan:
    """Select G per layer and compute its amplification w (module docstring).

    Args:
        named_params: (name, parameter) pairs, e.g. model.named_parameters(). Only names
            present in `saliency` are planned. A 3-D parameter is a fused experts tensor:
            one selection and w per expert.
        saliency: {name: float saliency shaped like the parameter}, finite and >= 0
            (compute_saliency's output), on any device: each layer is read, moved to its
            parameter's device as float32 and dropped in turn (with the defaults and
            plain tensors), so a lazy Mapping that loads a layer on access keeps one
            layer in memory.
        k: fraction of each layer's survivors to select, in (0, 1]; or "mass:m" with m in
            (0, 1]: per layer the fewest survivors holding a share m of their score (ties
            at the boundary all selected).
        alpha: redistribution strength, finite, >= 0 (0 gives w = 1 everywhere).
        w_max: cap on w, finite, >= 1.
        backend: kernel backend for the selection ("triton" | "torch" | None).
        score: "forget" selects by the saliency itself; "contrast" by `saliency.score`
            (needs a Saliency computed with retain_batches). tau is then in score units.
        scope: "layer" (a threshold per layer) or "global" (one threshold over all
            planned weights; the importances stay per layer).

    FSDP2: for a DTensor parameter (sharded on dim 0) with a DTensor saliency sharded
    alike, or the full plain saliency, G is selected over the whole logical tensor (exact,
    whatever the number of ranks). Its Selection holds this rank's local indices and
    offset and the global stats; plan_selection is collective (every rank, same layers).

    Returns:
        SelectionPlan: name -> LayerPlan, in the order of named_params.

    Raises:
        ValueError: bad k/alpha/w_max/score/scope, a saliency shape that differs from its
            parameter, saliency names that named_params does not contain, score="contrast"
            without a retain Fisher, or options other than per-layer fractions for fused
            experts tensors or DTensor parameters.
    """
    kind, value = _check_settings(k, alpha, w_max, score, scope, saliency)
    chosen_all = _gather(named_params, saliency)
    experts = _plan_fused(chosen_all, saliency, kind, value, score, scope, alpha, w_max, backend)
    chosen = {n: p for n, p in chosen_all.items() if n not in experts}
    layers: dict[str, LayerPlan] = dict(experts)
    layers.update(_plan_layers(chosen, saliency, kind, value, score, scope, alpha, w_max, backend))
    layers = {name: layers[name] for name in chosen_all}  # in the order of named_params
    return SelectionPlan(layers, k=k, alpha=alpha, w_max=w_max, score=score, scope=scope)


def _parse_k(k) -> tuple[str, float]:
    """("fraction", k) for k in (0, 1], ("mass", m) for the string "mass:m", m in (0, 1]."""
    if isinstance(k, str):
        head, _, tail = k.partition(":")
        try:
            share = float(tail)
        except ValueError:
            share = math.nan
        if head.strip() == "mass" and is_number(share, FRACTION):
            return "mass", share
    elif is_number(k, FRACTION):
        return "fraction", float(k)
    raise ValueError(f'k must be a fraction in (0, 1] or "mass:m" with m in (0, 1], got {k!r}')


def _check_settings(k, alpha, w_max, score, scope, saliency) -> tuple[str, float]:
    """Every setting of plan_selection, once; returns _parse_k(k)."""
    kind, value = _parse_k(k)
    check_number("alpha", alpha, NON_NEGATIVE)
    check_number("w_max", w_max, (1, INF, False, False))
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if kind == "mass" and scope == "global":
        raise ValueError('k="mass:m" selects per layer; it cannot be combined with scope="global"')
    if score == "contrast" and getattr(saliency, "retain", None) is None:
        raise ValueError(
            'score="contrast" needs a Saliency with a retain Fisher: '
            "compute_saliency(..., retain_batches=..., contrast=lambda)"
        )
    return kind, value


def _gather(named_params, saliency) -> dict[str, torch.Tensor]:
    """{name: param} for the names in saliency, in the order of named_params.

    Only the names are read here: each layer's scores are fetched (saliency[name]) and
    converted when that layer is planned (_scores_of), so a lazy Mapping that loads a
    layer on access, or a saliency held in host memory for GPU weights, costs one layer's
    float32 copy at a time rather than every layer's (8.6 B per entry for an 8B model)."""
    chosen: dict[str, torch.Tensor] = {}
    for name, param in named_params:
        if name in saliency and name not in chosen:
            chosen[name] = param
    missing = [name for name in saliency if name not in chosen]
    if missing:
        raise ValueError(
            f"saliency has {len(missing)} names that named_params lacks, e.g. {missing[:3]}; "
            "pass the same model's named_parameters()"
        )
    return chosen


def _scores_of(saliency, name: str, param: torch.Tensor) -> torch.Tensor:
    """saliency[name] as float32 on the parameter's device, its shape checked."""
    scores = saliency[name]
    if tuple(scores.shape) != tuple(param.shape):
        raise ValueError(
            f"saliency[{name!r}] has shape {tuple(scores.shape)} but the parameter has "
            f"shape {tuple(param.shape)}"
        )
    return scores.detach().to(device=param.device, dtype=torch.float32)


def _layer_w(selection: Selection, alpha: float, w_max: float) -> float:
    return amplification(
        float(selection.importance_pruned),
        float(selection.importance_selected),
        float(alpha),
        float(w_max),
    )


def _entry_scale_codes(sel: Selection, forget: torch.Tensor, w_max: float) -> torch.Tensor:
    """uint8 codes of c_i = clamp(s_i / mean_{j in G} s_j, 1/w_max, w_max) over G.

    sel's importances must be forget-saliency sums (mean = I_G / |G|).
    """
    mean = float(sel.importance_selected) / sel.n_selected if sel.n_selected else 0.0
    # index_select takes the int32 index as it is (no int64 copy of it first)
    selected = forget.reshape(-1).index_select(0, sel.index).float()
    return encode_entry_scale(selected, mean, w_max)


def _plan_fused(chosen, saliency, kind, value, score, scope, alpha, w_max, backend) -> dict:
    """{name: LayerPlan} of the 3-D (fused experts) parameters, planned expert by expert."""
    fused = [n for n, p in chosen.items() if p.dim() == 3 and not isinstance(p, DTensor)]
    if fused and (kind, score, scope) != ("fraction", "forget", "layer"):
        raise ValueError(
            f"fused experts tensors ({fused[0]!r}) are planned per expert only "
            'with k=<fraction>, score="forget", scope="layer"'
        )
    plans = {}
    for n in fused:
        scores = _scores_of(saliency, n, chosen[n])
        plans[n] = _plan_experts(chosen[n], scores, value, alpha, w_max, backend)
    return plans


def _plan_experts(param, scores, k, alpha, w_max, backend) -> LayerPlan:
    """Per-expert selections of a fused experts tensor [E, ...], merged into one index."""
    n_e = param[0].numel() if param.shape[0] else 0
    weight = param.detach()
    per_expert = [select_topk(scores[e], weight[e], k, backend=backend) for e in range(len(param))]
    # Offsets in int64 before narrowing: e * n_e may pass 2**31 in a big MoE tensor.
    parts = [sel.index.long() + e * n_e for e, sel in enumerate(per_expert)]
    empty = torch.zeros(0, dtype=torch.int64, device=param.device)
    index = (torch.cat(parts) if parts else empty).to(index_dtype(param.numel()))
    experts, start = [], 0
    for sel in per_expert:
        stop = start + sel.n_selected
        seg = dataclasses.replace(sel, index=index[start:stop])  # a view of the merged index
        experts.append(ExpertPlan(seg, _layer_w(sel, alpha, w_max), n_e))
        start = stop
    # amplify="saliency": c_i relative to each expert's own mean saliency over its G.
    codes = [_entry_scale_codes(sel, scores[e], w_max) for e, sel in enumerate(per_expert)]
    entry_scale = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.uint8)
    return LayerPlan(
        param=param,
        selection=_merged_selection(per_expert, index, param.device),
        amplification=max((ex.amplification for ex in experts), default=1.0),
        entry_scale=entry_scale.to(param.device),
        experts=tuple(experts),
    )


def _merged_selection(per_expert: list[Selection], index, device) -> Selection:
    """The experts' selections as one: counts and importances summed (float64, in expert
    order), threshold the lowest expert tau."""

    def total(field: str) -> torch.Tensor:
        values = [getattr(sel, field) for sel in per_expert]
        if not values:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(values).sum()

    taus = [float(sel.threshold) for sel in per_expert if sel.n_selected]
    return Selection(
        index=index,
        threshold=torch.tensor(min(taus, default=math.inf), dtype=torch.float32, device=device),
        n_survivors=sum(sel.n_survivors for sel in per_expert),
        n_selected=int(index.numel()),
        importance_pruned=total("importance_pruned"),
        importance_survivors=total("importance_survivors"),
        importance_selected=total("importance_selected"),
    )


def _plan_layers(chosen, saliency, kind, value, score, scope, alpha, w_max, backend) -> dict:
    """{name: LayerPlan} of the chosen (not fused) layers; chosen: {name: param}.

    Per-layer top-k of plain tensors fetches, selects and plans one layer at a time, so
    only one layer's float32 scores are alive; DTensor layers (one batch of collectives)
    and the options (global scope, mass, contrast) convert every layer first.
    """
    if (kind, score, scope) == ("fraction", "forget", "layer") and not any(
        isinstance(p, DTensor) for p in chosen.values()
    ):
        layers = {}
        for name, param in chosen.items():
            forget = _scores_of(saliency, name, param)
            selection = select_topk(forget, param.detach(), value, backend=backend)
            layers[name] = _layer_plan(param, forget, selection, score, alpha, w_max)
            del forget  # before the next layer's copy is made
        return layers
    pairs = {n: (p, _scores_of(saliency, n, p)) for n, p in chosen.items()}
    selections = _select_all(pairs, saliency, kind, value, score, scope, backend)
    return {
        name: _layer_plan(*pairs[name], selection, score, alpha, w_max)
        for name, selection in zip(pairs, selections)
    }


def _select_all(chosen, saliency, kind, value, score, scope, backend) -> list[Selection]:
    """One Selection per chosen layer, in order: per-layer top-k or the option paths."""
    if (kind, score, scope) == ("fraction", "forget", "layer"):
        return _select_topk_each(chosen, value, backend)
    if any(isinstance(p, DTensor) for p, _ in chosen.values()):
        raise ValueError(
            "score/scope/mass options are not supported for FSDP2 (DTensor) parameters "
            'yet; use k=<fraction>, score="forget", scope="layer"'
        )
    return _select_with_options(chosen, saliency, kind, value, score, scope, backend)


def _select_topk_each(chosen: dict, k: float, backend) -> list[Selection]:
    """One Selection per chosen layer. FSDP2 (DTensor) weights are selected over their
    whole logical tensor by sau_kernels.distributed, all layers in one batch of
    collectives; plain tensors by select_topk, one at a time."""
    pairs = list(chosen.values())
    if any(isinstance(p, DTensor) for p, _ in pairs):
        return select_topk_many(
            [s for _, s in pairs], [p.detach() for p, _ in pairs], k, backend=backend
        )
    return [select_topk(s, p.detach(), k, backend=backend) for p, s in pairs]


def _select_with_options(chosen, saliency, kind, value, score, scope, backend) -> list:
    """One Selection per chosen layer under the options (plain tensors only).

    Args:
        chosen: {name: (param, float32 forget saliency on its device)}, in plan order.
        saliency: the Saliency (for score="contrast").
        kind, value: _parse_k's result. score, scope: as plan_selection.
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


def _with_forget_importances(sel: Selection, forget: torch.Tensor, weight) -> Selection:
    """`sel` with I_P, I_S, I_G summed over the forget saliency (for score="contrast")."""
    s = forget.reshape(-1).double()
    survivors = weight.reshape(-1) != 0
    return dataclasses.replace(
        sel,
        importance_pruned=torch.where(survivors, 0.0, s).sum(),
        importance_survivors=torch.where(survivors, s, 0.0).sum(),
        importance_selected=s[sel.index.long()].sum(),
    )


def _local_scores(forget, param, selection: Selection) -> torch.Tensor:
    """The forget saliency of this rank's shard, flat, aligned with selection.index (local
    indices): a DTensor's local part, or the slice of a full plain saliency at the shard's
    offset (FSDP2); a plain param's saliency as is."""
    if isinstance(forget, DTensor) or not isinstance(param, DTensor):
        return local(forget).reshape(-1)
    n = local(param).numel()
    return forget.reshape(-1)[selection.offset : selection.offset + n]


def _layer_plan(param, forget, selection, score, alpha, w_max) -> LayerPlan:
    """A layer's w and per-entry scales from its selection and forget saliency."""
    if score == "contrast":
        selection = _with_forget_importances(selection, forget, param.detach())
    w = _layer_w(selection, alpha, w_max)
    codes = _entry_scale_codes(selection, _local_scores(forget, param, selection), w_max)
    return LayerPlan(param, selection, w, codes)
