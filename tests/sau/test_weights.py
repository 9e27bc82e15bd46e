"""sau.weights: which parameters are plannable, their kinds and their [out, in] views."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sau.weights import describe_weights, is_norm_or_embedding, plannable_weights


class Experts(nn.Module):
    """A fused experts module in transformers 5.x's layout: [experts, out, in]."""

    def __init__(self, n=3, hidden=8, inter=4, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        shape = (n, hidden, 2 * inter) if transposed else (n, 2 * inter, hidden)
        self.gate_up_proj = nn.Parameter(torch.randn(shape))
        self.down_proj = nn.Parameter(torch.randn(n, hidden, inter))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = Conv1D(24, 8)  # GPT-2 style: weight [in=8, out=24]
        self.proj = nn.Linear(8, 8)
        self.experts = Experts()


class Model(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 16, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_kinds_and_layouts():
    model = Model(tie=False)
    found = {w.name: w for w in plannable_weights(model)}
    assert list(found) == [
        "layers.0.attn.weight",
        "layers.0.proj.weight",
        "layers.0.experts.gate_up_proj",
        "layers.0.experts.down_proj",
        "layers.1.attn.weight",
        "layers.1.proj.weight",
        "layers.1.experts.gate_up_proj",
        "layers.1.experts.down_proj",
        "head.weight",  # untied head: a plannable Linear, but not pruned (blocks_only)
    ]
    conv = found["layers.0.attn.weight"]
    assert (conv.kind, conv.transposed, conv.n_layers, conv.in_features) == ("conv1d", True, 1, 8)
    assert conv.matrices()[0].shape == (24, 8)  # [out, in]
    ex = found["layers.0.experts.down_proj"]
    assert (ex.kind, ex.transposed, ex.n_layers, ex.in_features) == ("experts", False, 3, 4)
    assert [m.shape for m in ex.matrices()] == [(8, 4)] * 3
    assert "head.weight" not in [w.name for w in plannable_weights(model, blocks_only=True)]


def test_tied_head_is_an_embedding_and_stays_out():
    model = Model(tie=True)
    names = [w.name for w in plannable_weights(model)]
    assert "embed.weight" not in names and "head.weight" not in names
    assert is_norm_or_embedding(model, "embed.weight")
    assert is_norm_or_embedding(model, "layers.0.norm.weight")
    assert is_norm_or_embedding(model, "layers.0.norm.bias")
    assert not is_norm_or_embedding(model, "layers.0.proj.weight")
    assert not is_norm_or_embedding(model, "layers.0.proj.bias")


def test_transposed_experts_and_views_write_through():
    experts = Experts(transposed=True)
    (w, _) = plannable_weights(experts)
    assert w.transposed and w.in_features == 8
    views = w.matrices()
    assert views[1].shape == (8, 8)  # [out = 2 * inter, in = hidden]
    views[1][2, 5] = 0.0
    assert experts.gate_up_proj[1, 5, 2] == 0.0


def test_bare_modules_and_description():
    assert [w.kind for w in plannable_weights(nn.Linear(4, 2))] == ["linear"]
    assert plannable_weights(nn.LayerNorm(4)) == []
    assert plannable_weights(nn.Embedding(4, 2)) == []
    assert describe_weights([]) == "no plannable weights"
    text = describe_weights(plannable_weights(Model(), blocks_only=True))
    assert text.startswith("2 Linear weights, 2 Conv1D weights, 4 fused expert tensors (3 experts")
    assert text.endswith(f"{2 + 2 + 4 * 3} layers, {2 * (64 + 192 + 3 * 64 + 3 * 32)} entries")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_params_are_not_plannable(dtype):
    lin = nn.Linear(4, 4).to(dtype)
    assert len(plannable_weights(lin)) == 1
    lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    assert plannable_weights(lin) == []
