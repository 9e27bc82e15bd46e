"""One-shot pruning of a causal LM: magnitude and Wanda, unstructured or N:M.

Pruned weights are written as exact zeros into the dense tensors, which is the form SAU
unlearns (docs/method.md). The plannable weights inside the decoder blocks are pruned
(`sau.weights`: ``nn.Linear`` weights, GPT-2's ``Conv1D`` weights read as ``[out, in]``,
and fused MoE expert tensors, one layer per expert); embeddings, norms, routers and the
LM head stay dense, as in the Wanda and SparseGPT reference code.

Scores (higher = keep):

- magnitude: ``|W_ij|``; the ``round(sparsity * numel)`` lowest of each layer (each
  expert of a fused tensor) are zeroed.
- Wanda (Sun et al., 2023): ``|W_ij| * ||X_j||_2``, where ``X_j`` is input channel ``j`` of
  the layer over all calibration tokens; compared within each output row ``i`` so every
  row loses ``round(sparsity * in_features)`` weights.
- N:M (either score): in every group of ``m`` consecutive input weights of a row, the
  ``n`` highest-scoring are kept (2:4 is what sparse tensor cores accelerate).

Ties are broken by position: among equal scores the lower flat index is pruned first
(stable sort), so a run is reproducible bit for bit.

Deviation from the Wanda reference: it prunes block by block and feeds each block's
*pruned* output to the next; here all input norms are collected in one pass over the
dense model (one forward per calibration batch instead of one per block). An expert that
no calibration token was routed to has no input statistic; it is pruned by magnitude.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sau.calib import input_channel_norms
from sau.names import PRUNE_METHODS
from sau.settings import check_number
from sau.weights import KINDS, PlannableWeight, plannable_weights

__all__ = [
    "LayerPruneStats",
    "PruneReport",
    "prunable_weights",
    "prune_model",
    "pruned_masks",
    "target_linear_names",
]


@dataclass(frozen=True)
class LayerPruneStats:
    """One row of the pruning table: a weight's name, shape and how much of it is zero."""

    name: str
    shape: tuple[int, ...]
    numel: int
    n_zero: int
    sparsity: float
    kind: str = "linear"  # "linear" | "conv1d" | "experts" (sau.weights)
    n_layers: int = 1  # experts in a fused tensor, pruned one by one


@dataclass
class PruneReport:
    """What `prune_model` did: the method and one `LayerPruneStats` per pruned weight."""

    method: str
    target_sparsity: float
    nm: tuple[int, int] | None
    layers: list[LayerPruneStats] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Total entries over the pruned weights."""
        return sum(row.numel for row in self.layers)

    @property
    def n_zero(self) -> int:
        """Total exact zeros over the pruned weights."""
        return sum(row.n_zero for row in self.layers)

    @property
    def sparsity(self) -> float:
        """Overall fraction of zeros over the pruned weights (0.0 when there are none)."""
        return self.n_zero / self.numel if self.numel else 0.0

    def by_kind(self) -> dict[str, dict]:
        """Per kind of weight present: {"weights", "layers", "numel", "n_zero", "sparsity"}."""
        out = {}
        for kind in KINDS:
            rows = [r for r in self.layers if r.kind == kind]
            if rows:
                numel, zeros = sum(r.numel for r in rows), sum(r.n_zero for r in rows)
                out[kind] = {
                    "weights": len(rows),
                    "layers": sum(r.n_layers for r in rows),
                    "numel": numel,
                    "n_zero": zeros,
                    "sparsity": zeros / numel if numel else 0.0,
                }
        return out

    def to_dict(self) -> dict:
        """A JSON-ready dict: method, target, N:M, totals, per-kind totals, per-layer rows."""
        return {
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            "nm": list(self.nm) if self.nm else None,
            "numel": self.numel,
            "n_zero": self.n_zero,
            "sparsity": self.sparsity,
            "by_kind": self.by_kind(),
            "layers": [{**asdict(row), "shape": list(row.shape)} for row in self.layers],
        }

    def to_json(self) -> str:
        """`to_dict` as a JSON string, indented by 2."""
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        """A fixed-width table, one line per layer plus a total line."""
        pattern = f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured"
        width = max([len(row.name) for row in self.layers] + [5])
        lines = [
            f"method={self.method} pattern={pattern} target={self.target_sparsity:.4f}",
            f"{'layer':<{width}}  {'shape':>14}  {'numel':>12}  {'zeros':>12}  sparsity",
        ]
        for row in self.layers:
            shape = "x".join(str(d) for d in row.shape)
            lines.append(
                f"{row.name:<{width}}  {shape:>14}  {row.numel:>12}  {row.n_zero:>12}"
                f"  {row.sparsity:.4f}"
            )
        lines.append(
            f"{'total':<{width}}  {'':>14}  {self.numel:>12}  {self.n_zero:>12}"
            f"  {self.sparsity:.4f}"
        )
        for kind, row in self.by_kind().items():
            lines.append(
                f"{kind}: {row['weights']} weights, {row['layers']} layers, "
                f"sparsity {row['sparsity']:.4f}"
            )
        return "\n".join(lines)


def prunable_weights(model: nn.Module) -> list[PlannableWeight]:
    """The weights `prune_model` prunes: `sau.weights.plannable_weights` inside the
    decoder blocks (the children of the model's ``nn.ModuleList``; every plannable weight
    when it has none), never the output head."""
    return plannable_weights(model, blocks_only=True)


def target_linear_names(model: nn.Module) -> list[str]:
    """Parameter names (``"model.layers.0.mlp.up_proj.weight"``) of the weights pruned.

    These are the names of `prunable_weights` (Linear, Conv1D and fused expert weights
    inside the decoder blocks), in module order; never embeddings, norms, routers or the
    LM head. Names match ``model.named_parameters()`` and the saliency dict of
    ``sau.compute_saliency``. (The name predates Conv1D and expert support.)
    """
    return [w.name for w in prunable_weights(model)]


def pruned_masks(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Where each target weight is exactly zero.

    Returns name -> bool tensor of the weight's shape, on the weight's device, True where
    ``weight == 0``. ``names`` defaults to `target_linear_names(model)`. Taken right after
    pruning, it tells after unlearning whether every pruned entry is still exactly zero.
    """
    names = target_linear_names(model) if names is None else list(names)
    return {name: model.get_parameter(name).detach() == 0 for name in names}


def _check_args(method: str, sparsity: float, nm) -> tuple[int, int] | None:
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {PRUNE_METHODS}, got {method!r}")
    check_number("sparsity", sparsity, (0, 1, False, True), what="a fraction")
    if nm is None:
        return None
    try:
        n, m = (int(v) for v in nm)
    except (TypeError, ValueError):
        raise ValueError(f"nm must be a pair (n, m) such as (2, 4), got {nm!r}") from None
    if not 0 < n <= m:
        raise ValueError(f"nm=(n, m) needs 0 < n <= m, got ({n}, {m})")
    return n, m


def _prune_mask(score: torch.Tensor, sparsity: float, nm, per_row: bool) -> torch.Tensor:
    """Bool mask (True = prune) of ``score``'s shape [out, in] (float32); N:M groups run
    along ``in``."""
    rows, cols = score.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    if nm is not None:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)
        # stable sort: among equal scores the earlier column is pruned first
        order = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
        mask.view(rows, cols // m, m).scatter_(-1, order, True)
    elif per_row:
        count = round(sparsity * cols)
        order = torch.sort(score, dim=-1, stable=True).indices[:, :count]
        mask.scatter_(-1, order, True)
    else:
        count = round(sparsity * score.numel())
        order = torch.sort(score.reshape(-1), stable=True).indices[:count]
        mask.view(-1)[order] = True
    return mask


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float = 0.5,
    *,
    nm: tuple[int, int] | None = None,
    calib_batches: Iterable | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune the decoder-block weights of ``model`` in place (`prunable_weights`); return
    the table.

    Args:
        model: any ``nn.Module``; typically a transformers causal LM. Weights may be
            float32, float16 or bfloat16; scores are computed in float32.
        method: ``"magnitude"`` (per layer, ``round(sparsity * numel)`` zeros per weight,
            per expert of a fused tensor) or ``"wanda"`` (per output row,
            ``round(sparsity * in_features)`` zeros each).
        sparsity: fraction in [0, 1). Ignored when ``nm`` is given: the pattern fixes it
            at ``1 - n / m``.
        nm: ``(n, m)``, e.g. ``(2, 4)``: keep ``n`` of every ``m`` consecutive input
            weights (along the input dimension, also for Conv1D's ``[in, out]`` layout).
            ``in_features`` of every target must be divisible by ``m``.
        calib_batches: required for Wanda; an iterable of ``input_ids`` LongTensors [B, T],
            ``(input_ids, attention_mask)`` pairs or dicts passed as ``model(**batch)``.
        progress: show a tqdm bar over layers.

    Raises:
        ValueError: bad method, sparsity outside [0, 1), malformed ``nm``, a weight whose
            ``in_features`` is not divisible by ``m``, Wanda without calibration data, or
            a model with no prunable weight.
    """
    nm = _check_args(method, sparsity, nm)
    weights = prunable_weights(model)
    _check_weights(weights, nm)
    norms = None
    if method == "wanda":
        if calib_batches is None:
            raise ValueError("method='wanda' needs calib_batches (token ids to calibrate on)")
        norms = input_channel_norms(model, weights, calib_batches, progress=progress)

    target = 1.0 - nm[0] / nm[1] if nm is not None else float(sparsity)
    report = PruneReport(method=method, target_sparsity=target, nm=nm)
    for w in tqdm(weights, desc=f"prune ({method})", disable=not progress):
        _prune_weight(w, norms, float(sparsity), nm, per_row=method == "wanda")
        report.layers.append(_layer_stats(w))
    return report


def _check_weights(weights, nm) -> None:
    if not weights:
        raise ValueError(
            "the model has no prunable weight (no nn.Linear, Conv1D or fused experts tensor "
            "inside its decoder blocks)"
        )
    if nm is not None:
        bad = [w.name for w in weights if w.in_features % nm[1]]
        if bad:
            raise ValueError(
                f"N:M {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}; "
                f"not so for {', '.join(bad[:3])}"
            )


def _prune_weight(w, norms, sparsity: float, nm, *, per_row: bool) -> None:
    """Zero the lowest-scored entries of one prunable weight in place, expert by expert."""
    for i, matrix in enumerate(w.matrices()):  # [out, in] views, one per expert
        score = matrix.abs().float()
        if norms is not None and bool(norms[w.name][i].any()):
            # An expert no calibration token reached has all-zero norms: magnitude.
            score = score * norms[w.name][i].to(score.device).unsqueeze(0)
        mask = _prune_mask(score, sparsity, nm, per_row=per_row)
        matrix.masked_fill_(mask, 0)


def _layer_stats(w) -> LayerPruneStats:
    weight = w.param
    n_zero = int((weight == 0).sum())
    return LayerPruneStats(
        name=w.name,
        shape=tuple(weight.shape),
        numel=weight.numel(),
        n_zero=n_zero,
        sparsity=n_zero / weight.numel() if weight.numel() else 0.0,
        kind=w.kind,
        n_layers=w.n_layers,
    )
