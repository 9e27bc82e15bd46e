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
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

MODEL_BIN = "model.bin"
MODEL_JSON = "model.json"  # written after model.bin: its existence means "model ready"


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
            view = _raw(t)
            got = f.readinto(view)
            while got < view.nbytes:  # readinto may return short reads
                more = f.readinto(view[got:])
                if not more:
                    raise ValueError(f"{cache / MODEL_BIN} is truncated")
                got += more
    return doc["names"], doc["sparsity"]
