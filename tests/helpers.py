"""Helpers shared by test modules (test modules do not import each other)."""

from __future__ import annotations

import torch
from torch import nn


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
