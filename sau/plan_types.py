"""What a selection plan is: per-layer (and per-expert) selections, amplifications and
the stats table reports show. Made by sau.plan.plan_selection; read by SAUAdamW.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from sau_kernels import Selection

__all__ = ["ExpertPlan", "LayerPlan", "SelectionPlan", "amplification"]


def amplification(
    importance_pruned: float, importance_selected: float, alpha: float, w_max: float
) -> float:
    """w = min(1 + alpha * I_P / I_G, w_max); 1 when I_G == 0 (nothing to amplify)."""
    if importance_selected == 0:
        return 1.0
    return min(1.0 + alpha * importance_pruned / importance_selected, w_max)


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
        experts: per-expert plans of a fused experts tensor, in expert order; () else.
        entry_scale: uint8 codes (one per entry of G) of the per-entry update scales
            c_i = clamp(s_i / mean_G s, 1/w_max, w_max) that SAUAdamW(amplify="saliency")
            applies; None for plans made by hand.
    """

    param: torch.nn.Parameter
    selection: Selection
    amplification: float
    entry_scale: torch.Tensor | None = None
    experts: tuple[ExpertPlan, ...] = ()

    def segments(self) -> tuple[tuple[int, int, float], ...]:
        """(start, stop, w) per segment of selection.index the step treats alike: one
        for a matrix, one per expert."""
        if not self.experts:
            return ((0, self.selection.n_selected, float(self.amplification)),)
        out, start = [], 0
        for expert in self.experts:
            stop = start + expert.selection.n_selected
            out.append((start, stop, float(expert.amplification)))
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
        (SAUAdamW matches a plan's layers to its parameters by identity)."""
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

    def to_json(self, indent: int | None = 2) -> str:
        """to_dict() as strict JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

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
