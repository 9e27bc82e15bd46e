"""Helpers shared by test modules (test modules do not import each other)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from sau.lab.data import generate
from sau.lab.models.default import DefaultArtifacts


def triton_runnable() -> bool:
    """True when Triton kernels can run here: a CUDA device, or TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


class _Probe(torch.autograd.Function):
    """Identity whose backward records how many gradient bytes are alive right then."""

    @staticmethod
    def forward(ctx, x, record):
        ctx.record = record
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.record()
        return g, None


class DeepProbeNet(nn.Module):
    """`n_layers` Linear(width, width) + tanh, with a probe between layers.

    During backward each probe records the bytes of all .grad tensors alive at that moment;
    `peak` is the largest such sum (reset it to 0 before a measured backward). forward(x)
    returns a scalar loss. x: float32 (batch, width).
    """

    def __init__(self, n_layers: int = 8, width: int = 64):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))
        self.peak = 0

    def record(self) -> None:
        alive = sum(p.grad.nbytes for p in self.parameters() if p.grad is not None)
        self.peak = max(self.peak, alive)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = _Probe.apply(torch.tanh(layer(x)), self.record)
        return x.pow(2).mean()


def pruned_mlp(dtype, seed: int = 0) -> nn.Sequential:
    """Linear(16, 24) - Tanh - Linear(24, 8) in `dtype`, seeded through the global RNG,
    each weight pruned at its median magnitude (about half its entries exact zeros)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).to(dtype)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight
            w[w.abs() <= w.abs().view(-1).float().median().to(dtype)] = 0
    return model


def pruned_tiny_llama(seed: int = 0, layers: int = 2):
    """A tiny Llama (hidden 32, vocab 64) with every decoder Linear 50% magnitude-pruned.

    Trainable: the decoder Linear weights (planned by SAU tests) and the final norm
    (a dense parameter). Deterministic from `seed`; every rank builds the same one.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            linear = ".layers." in name and name.endswith("proj.weight")
            if linear:
                p[p.abs() <= p.abs().median()] = 0
            p.requires_grad_(linear or name == "model.norm.weight")
    return model


def llama_planned_names(model) -> list[str]:
    """Names of the decoder Linear weights of `pruned_tiny_llama` (FSDP2 keeps names)."""
    return [n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]


def shard_llama(model) -> None:
    """fully_shard each decoder layer, then the root (FSDP2, the default mesh)."""
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def stand_in_default(files: Path) -> DefaultArtifacts:
    """What `build_default` would return, made of a `make_cli_files` directory: its tiny
    model as both target and retain model and the 5-person corpus of its QA files. Tests
    of `sau demo` patch `sau.lab.models.build_default` to return it (training the real
    default takes a minute)."""
    dataset = generate(seed=0, n_people=5, n_general=4)
    return DefaultArtifacts(dataset, files, files, files / "model", files / "model", {})
