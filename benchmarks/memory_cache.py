"""The benchmark model, built once per run and read back by every child.

benchmarks/memory.py runs eight children (one per configuration, each its own process,
so each has its own peak) from the same 50%-pruned random-weight Llama. Building it is not
what any row measures, yet it cost every child 20 s on the 2-core VM when idle and up to
100 s when loaded. A `prepare` child now builds it once and writes every parameter and
buffer (raw bytes in module order, `model.bin`, plus a `model.json` manifest) under a
scratch directory; each row's child builds the same model without any initializer and
reads the bytes with readinto() into its own tensors: memory the child allocates itself
(no mmap, nothing shared with the page cache), filled before the child takes its base
RSS. The tensors are bitwise those of building in place (tests/benchmarks/test_memory.py).

The manifest is written last, through a rename: once it exists the model is complete, and
memory.py starts the rows' children.

The SAU step rows' plan is made the same way: `prepare` runs sau.plan_selection (k = 0.3)
once per depth from a random bfloat16 saliency and writes each layer's index, per-entry
codes and scalars (`plan.bin`, `plan.json`, written before `model.json`); each SAU row
reads them back into its own tensors (`load_plan`). The rows step exactly the entries the
library's planner selects, without paying for the selection in every child.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

MODEL_BIN = "model.bin"
MODEL_JSON = "model.json"  # written after model.bin: its existence means "model ready"
PLAN_BIN = "plan.bin"
PLAN_JSON = "plan.json"


def _tensors(model) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer (non-persistent ones too: rotary inv_freq), in order."""
    out = [(f"param:{n}", p) for n, p in model.named_parameters()]
    return out + [(f"buffer:{n}", b) for n, b in model.named_buffers()]


def _raw(t: torch.Tensor):
    """A writable uint8 numpy view of a contiguous tensor's bytes (any dtype, bf16 too)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("the weight cache holds contiguous CPU tensors only")
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def save_model(model, names: list[str], sparsity: float, cache: Path) -> None:
    """Write every parameter and buffer of `model` (CPU) to cache/model.bin + model.json.

    names: the trainable decoder Linear weights (build_model's second result);
    sparsity: their fraction of exact zeros. Both go into the manifest.
    """
    cache.mkdir(parents=True, exist_ok=True)
    entries = []
    with open(cache / MODEL_BIN, "wb") as f:
        for key, t in _tensors(model):
            _raw(t).tofile(f)
            entries.append([key, str(t.dtype).removeprefix("torch."), list(t.shape)])
    doc = {"tensors": entries, "names": names, "sparsity": sparsity}
    tmp = cache / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, cache / MODEL_JSON)


def load_model_into(model, cache: Path) -> tuple[list[str], float]:
    """Fill every parameter and buffer of `model` from cache (written by save_model for a
    model of the same config). Returns (trainable names, sparsity) from the manifest.

    Raises ValueError when the model's tensors differ from the manifest's in name, dtype
    or shape (a cache made for another configuration).
    """
    doc = json.loads((cache / MODEL_JSON).read_text())
    tensors = _tensors(model)
    have = [[k, str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors]
    if have != doc["tensors"]:
        raise ValueError(f"{cache / MODEL_JSON} describes another model")
    with open(cache / MODEL_BIN, "rb", buffering=0) as f:
        for _, t in tensors:
            _read_exact(f, t, cache / MODEL_BIN)
    return doc["names"], doc["sparsity"]


def _read_exact(f, t: torch.Tensor, path: Path) -> None:
    """Fill tensor `t` from the open file `f` (short reads retried)."""
    view = _raw(t)
    got = f.readinto(view)
    while got < view.nbytes:
        more = f.readinto(view[got:])
        if not more:
            raise ValueError(f"{path} is truncated")
        got += more


def save_plan(plan, cache: Path) -> None:
    """Write a SelectionPlan (plain CPU tensors, no fused experts) to cache/plan.bin +
    plan.json: per layer its index and entry_scale bytes, then its scalars."""
    cache.mkdir(parents=True, exist_ok=True)
    layers = []
    with open(cache / PLAN_BIN, "wb") as f:
        for name, lp in plan.items():
            sel = lp.selection
            for t in (sel.index, lp.entry_scale):
                _raw(t.contiguous()).tofile(f)
            layers.append(
                dict(
                    name=name,
                    index_dtype=str(sel.index.dtype).removeprefix("torch."),
                    n=int(sel.index.numel()),
                    threshold=float(sel.threshold),
                    n_survivors=int(sel.n_survivors),
                    n_selected=int(sel.n_selected),
                    importances=[float(x) for x in _importances(sel)],
                    w=float(lp.amplification),
                )
            )
    doc = dict(k=plan.k, alpha=plan.alpha, w_max=plan.w_max, layers=layers)
    tmp = cache / (PLAN_JSON + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, cache / PLAN_JSON)


def _importances(sel) -> tuple:
    return (sel.importance_pruned, sel.importance_survivors, sel.importance_selected)


def load_plan(model, cache: Path):
    """The SelectionPlan save_plan wrote, bound to `model`'s parameters (its own tensors,
    read with readinto: no mmap, memory the reading process owns)."""
    from sau.plan import LayerPlan, SelectionPlan
    from sau_kernels.selection import Selection

    doc = json.loads((cache / PLAN_JSON).read_text())
    f64 = dict(dtype=torch.float64)
    layers = {}
    with open(cache / PLAN_BIN, "rb", buffering=0) as f:
        for row in doc["layers"]:
            index = torch.empty(row["n"], dtype=getattr(torch, row["index_dtype"]))
            codes = torch.empty(row["n"], dtype=torch.uint8)
            _read_exact(f, index, cache / PLAN_BIN)
            _read_exact(f, codes, cache / PLAN_BIN)
            i_p, i_s, i_g = (torch.tensor(x, **f64) for x in row["importances"])
            sel = Selection(
                index=index,
                threshold=torch.tensor(row["threshold"], dtype=torch.float32),
                n_survivors=row["n_survivors"],
                n_selected=row["n_selected"],
                importance_pruned=i_p,
                importance_survivors=i_s,
                importance_selected=i_g,
            )
            param = model.get_parameter(row["name"])
            layers[row["name"]] = LayerPlan(param, sel, row["w"], codes)
    return SelectionPlan(layers, k=doc["k"], alpha=doc["alpha"], w_max=doc["w_max"])
