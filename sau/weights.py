"""What SAU prunes, scores, plans and steps: one notion of "a plannable weight".

A plannable weight is a floating-point parameter that acts as one or more matrices
mapping an input vector to an output vector:

- ``linear``: the 2-D ``weight`` of an ``nn.Linear``, laid out ``[out, in]``.
- ``conv1d``: the 2-D ``weight`` of transformers' ``Conv1D`` (GPT-2 and its family), laid
  out ``[in, out]`` (``x @ W``): wherever the input dimension matters (Wanda's input
  norms, N:M groups along the input) it is read through ``W.t()``.
- ``experts``: a 3-D fused expert tensor ``[experts, out, in]`` (Mixtral's and
  Qwen2-MoE's ``mlp.experts.gate_up_proj`` / ``down_proj`` in transformers 5.x), or
  ``[experts, in, out]`` when its module says ``is_transposed``. Each expert slice
  ``param[e]`` is one layer of its own: its own pruning count, its own top-k, tau and
  amplification w (`sau.plan`), as the paper's per-layer rule intends.

Embeddings, norms, biases and routers are not plannable by default (routers in
transformers 5.x are ``*TopKRouter`` modules, not ``nn.Linear``); an output head tied to
the input embedding is the embedding and stays out too. `sau.compute_saliency` accepts a
norm or embedding name in ``params=`` only with ``allow_norms_and_embeddings=True``.

Pruning (`sau.prune`) takes the plannable weights inside the decoder blocks (children of
the model's ``nn.ModuleList``), never the output head; saliency defaults take every
plannable weight of the model (an untied ``lm_head`` included).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "KINDS",
    "PlannableWeight",
    "describe_weights",
    "is_norm_or_embedding",
    "layer_matrices",
    "plannable_weights",
]

KINDS = ("linear", "conv1d", "experts")


@dataclass(frozen=True)
class PlannableWeight:
    """One plannable parameter of a model.

    Attributes:
        name: its name in ``model.named_parameters()`` (the canonical one when tied).
        param: the parameter (2-D for linear / conv1d, 3-D for experts).
        kind: "linear" | "conv1d" | "experts".
        module: the module that owns it (its Wanda input hook goes there).
        transposed: True when each layer is stored ``[in, out]`` (conv1d, transposed
            experts).
    """

    name: str
    param: nn.Parameter
    kind: str
    module: nn.Module
    transposed: bool

    @property
    def n_layers(self) -> int:
        """Independent layers inside the parameter: the expert count, else 1."""
        return self.param.shape[0] if self.kind == "experts" else 1

    @property
    def in_features(self) -> int:
        """Input width of each layer."""
        return self.param.shape[-2] if self.transposed else self.param.shape[-1]

    def matrices(self) -> list[torch.Tensor]:
        """`layer_matrices` of this weight: one ``[out, in]`` view per layer."""
        return layer_matrices(self.param.detach(), self.kind, self.transposed)


def layer_matrices(param: torch.Tensor, kind: str, transposed: bool) -> list[torch.Tensor]:
    """Views ``[out, in]`` of each layer of ``param`` (writes through to it).

    Args:
        param: 2-D (linear, conv1d) or 3-D (experts, one layer per leading index).
        kind: one of `KINDS`; transposed: layers stored ``[in, out]``.
    Returns: a list of 2-D views; a transposed layer's view is not contiguous.
    """
    layers = list(param.unbind(0)) if kind == "experts" else [param]
    return [m.t() if transposed else m for m in layers]


def _conv1d_type():
    # transformers is imported only if the model uses it: a model holding a Conv1D has
    # already imported transformers.pytorch_utils, so this never pulls transformers in.
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _classify(module: nn.Module, attr: str, p: torch.Tensor) -> tuple[str, bool] | None:
    """(kind, transposed) of parameter `attr` of `module`, or None if not plannable."""
    if not p.is_floating_point():
        return None
    conv1d = _conv1d_type()
    if attr == "weight" and p.dim() == 2:
        if isinstance(module, nn.Linear):
            return "linear", False
        if conv1d is not None and isinstance(module, conv1d):
            return "conv1d", True
        return None
    if p.dim() == 3 and not isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)):
        return "experts", bool(getattr(module, "is_transposed", False))
    return None


def _block_prefixes(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)]


def plannable_weights(model: nn.Module, *, blocks_only: bool = False) -> list[PlannableWeight]:
    """Every plannable weight of ``model``, in module order, each tensor once.

    Args:
        model: any nn.Module (typically a transformers causal LM).
        blocks_only: only weights inside the decoder blocks (the children of the model's
            ``nn.ModuleList``s; every weight when the model has none) and never the output
            head: what `sau.prune` prunes.
    Returns:
        PlannableWeight per weight. An output head whose weight is the input embedding's
        (tied) is left out in both modes: it is an embedding.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    emb_getter = getattr(model, "get_input_embeddings", None)
    emb = emb_getter() if callable(emb_getter) else None
    emb_weight = getattr(emb, "weight", None)
    prefixes = _block_prefixes(model) if blocks_only else []
    out: list[PlannableWeight] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        if blocks_only and module is head:
            continue
        if prefixes and not any(mod_name.startswith(pre + ".") for pre in prefixes):
            continue
        for attr, p in module.named_parameters(recurse=False):
            found = _classify(module, attr, p)
            if found is None or id(p) in seen or id(p) not in canonical:
                continue
            if emb_weight is not None and p is emb_weight:
                continue  # a head tied to the input embedding
            seen.add(id(p))
            out.append(PlannableWeight(canonical[id(p)], p, found[0], module, found[1]))
    return out


def is_norm_or_embedding(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to a norm or embedding module (or is tied to one).

    Norms are modules whose class name contains "Norm" (LayerNorm, RMSNorm, ...);
    embeddings are ``nn.Embedding`` subclasses and any module sharing their weight.
    """
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    param = getattr(module, attr, None)
    if "Norm" in type(module).__name__ or isinstance(module, nn.Embedding):
        return True
    embedding_weights = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.weight is not None
    }
    return param is not None and id(param) in embedding_weights


def describe_weights(weights: Iterable[PlannableWeight]) -> str:
    """One line of what was found, per kind, e.g.
    "8 Linear weights, 4 fused expert tensors (4 experts each): 24 layers, 55296 entries".

    Returns "no plannable weights" for an empty input.
    """
    weights = list(weights)
    if not weights:
        return "no plannable weights"
    counts = Counter(w.kind for w in weights)
    labels = {"linear": "Linear", "conv1d": "Conv1D"}
    parts = []
    for kind in KINDS:
        if not counts[kind]:
            continue
        if kind == "experts":
            sizes = sorted({w.n_layers for w in weights if w.kind == kind})
            each = "/".join(str(s) for s in sizes)
            parts.append(f"{counts[kind]} fused expert tensors ({each} experts each)")
        else:
            parts.append(f"{counts[kind]} {labels[kind]} weights")
    n_layers = sum(w.n_layers for w in weights)
    numel = sum(w.param.numel() for w in weights)
    return f"{', '.join(parts)}: {n_layers} layers, {numel} entries"
