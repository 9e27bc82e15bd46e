"""Conv1D ([in, out]) and fused experts ([E, out, in]) through pruning, planning and the step.

Each is compared against the same weights laid out as plain nn.Linear matrices, one per
expert: a Conv1D or a fused experts tensor must prune, select and step exactly like them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sau import SAUAdamW, plan_selection
from sau.calib import input_channel_norms
from sau.prune import prune_model
from sau.weights import plannable_weights
from sau_kernels import reference as R

E, HIDDEN, INTER = 3, 8, 4


class Experts(nn.Module):
    """transformers 5.x fused experts (Mixtral's eager forward), top-1 routing by index."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INTER, HIDDEN, generator=g))
        self.down_proj = nn.Parameter(torch.randn(E, HIDDEN, INTER, generator=g))
        self.act_fn = nn.SiLU()

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e in range(E):
            rows = (top_k_index == e).any(-1)
            h = self._apply_gate(hidden[rows] @ self.gate_up_proj[e].t())
            out[rows] += h @ self.down_proj[e].t()
        return out


class MoE(nn.Module):
    """Routes token t to expert route[t] (expert E - 1 never, unless route says so)."""

    def __init__(self, route):
        super().__init__()
        self.layers = nn.ModuleList([Experts()])
        self.route = route

    def forward(self, x):
        hidden = x.reshape(-1, HIDDEN)
        idx = self.route[: hidden.shape[0]].unsqueeze(-1)
        return self.layers[0](hidden, idx, torch.ones_like(idx, dtype=hidden.dtype))


def conv1d_and_linear(seed=0):
    torch.manual_seed(seed)
    conv = Conv1D(12, 8)  # weight [in=8, out=12]
    lin = nn.Linear(8, 12)
    with torch.no_grad():
        conv.weight.normal_()
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return conv, lin


@pytest.mark.parametrize(
    "method, sparsity, nm", [("magnitude", 0.5, None), ("wanda", 0.5, None), ("wanda", 0, (2, 4))]
)
def test_conv1d_prunes_like_the_equivalent_linear(method, sparsity, nm):
    conv, lin = conv1d_and_linear()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 9)
    calib = [x] if method == "wanda" else None
    # The modules are their own model: pruning hooks their input directly.
    prune_model(conv, method, sparsity, nm=nm, calib_batches=calib, progress=False)
    prune_model(lin, method, sparsity, nm=nm, calib_batches=calib, progress=False)
    assert torch.equal(conv.weight.t() == 0, lin.weight == 0)
    if nm:  # groups of 4 along the input dimension (dim 0 of Conv1D's weight)
        assert bool(((conv.weight != 0).reshape(2, 4, 12).sum(1) == 2).all())


def test_expert_wanda_norms_count_only_routed_tokens():
    route = torch.tensor([0, 1, 0, 1, 1, 0])  # expert 2 never routed
    model = MoE(route)
    x = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(2))
    weights = plannable_weights(model)
    norms = input_channel_norms(model, weights, [x])
    experts = model.layers[0]
    hidden = x.reshape(-1, HIDDEN)
    for e in range(E):
        rows = hidden[route == e]
        inner = experts._apply_gate(rows @ experts.gate_up_proj[e].detach().t())
        torch.testing.assert_close(norms[weights[0].name][e], rows.norm(dim=0))
        torch.testing.assert_close(norms[weights[1].name][e], inner.norm(dim=0))
    assert float(norms[weights[0].name][2].abs().sum()) == 0.0


def test_each_expert_pruned_on_its_own_unrouted_by_magnitude():
    route = torch.tensor([0, 1, 0, 1, 1, 0])
    wanda, mag = MoE(route), MoE(route)
    x = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(2))
    report = prune_model(wanda, "wanda", 0.5, calib_batches=[x], progress=False)
    prune_model(mag, "magnitude", 0.5, progress=False)
    assert [(r.kind, r.n_layers, r.sparsity) for r in report.layers] == [("experts", E, 0.5)] * 2
    for name, p in wanda.named_parameters():
        for e in range(E):
            assert bool(((p[e] == 0).sum(1) == p.shape[-1] // 2).all())  # per row, per expert
        # the never-routed expert had no input statistic: pruned by magnitude (per layer)
        assert int((p[2] == 0).sum()) == p[2].numel() // 2
        ref = mag.get_parameter(name)[2]
        assert (p[2] == 0).sum() == (ref == 0).sum()


def expert_plan(k=0.3, seed=0, device="cpu"):
    model = MoE(torch.zeros(6, dtype=torch.long))
    prune_model(model, "magnitude", 0.5, progress=False)
    model.to(device)
    g = torch.Generator().manual_seed(seed)
    saliency = {
        n: (torch.rand(p.shape, generator=g) ** 3).to(device) for n, p in model.named_parameters()
    }
    saliency["layers.0.down_proj"][1] = 0.0  # an expert with no forget signal
    return model, saliency, plan_selection(model.named_parameters(), saliency, k=k, alpha=0.5)


def test_plan_is_per_expert():
    model, saliency, plan = expert_plan()
    for name, p in model.named_parameters():
        layer = plan[name]
        assert len(layer.experts) == E
        n_e = p[0].numel()
        starts = [0]
        for e, ex in enumerate(layer.experts):
            want = R.select_topk(saliency[name][e], p.detach()[e], 0.3)
            assert torch.equal(ex.selection.index.long() - e * n_e, want.index.long())
            assert torch.equal(ex.selection.threshold, want.threshold)
            if want.n_selected:
                w = 1 + 0.5 * float(want.importance_pruned) / float(want.importance_selected)
                assert ex.amplification == pytest.approx(w, rel=1e-12)
            else:
                assert ex.amplification == 1.0
            starts.append(starts[-1] + ex.selection.n_selected)
        index = layer.selection.index
        assert index.dtype == torch.int32 and bool((index[1:] > index[:-1]).all())
        assert [(a, b) for a, b, _ in layer.segments()] == list(zip(starts[:-1], starts[1:]))
        assert layer.selection.n_selected == starts[-1]
    assert plan["layers.0.down_proj"].experts[1].selection.n_selected == 0
    rows = plan.stats()
    assert [r["name"] for r in rows[:E]] == [f"layers.0.gate_up_proj[{e}]" for e in range(E)]
    assert plan.totals()["numel"] == sum(p.numel() for p in model.parameters())
    assert plan.to_json()  # strict JSON: the empty expert's tau is null


def masked_reference(p0, grads, plan, name, amplify, wd, lr=1e-2):
    """The step on each expert slice as its own matrix: select_topk index, own w."""
    p = p0.clone()
    layer = plan[name]
    states = []
    for e, ex in enumerate(layer.experts):
        idx = ex.selection.index.long() - e * p[0].numel()
        zeros = torch.zeros(idx.numel(), device=p0.device)
        states.append((idx, zeros, zeros.clone(), ex.amplification))
    for step, g in enumerate(grads, 1):
        for e, (idx, m, v, w) in enumerate(states):
            view = p[e]
            R.masked_adamw_(
                view, g[e], m, v, idx, step=step, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=wd, grad_scale=w if amplify == "grad" else 1.0,
                update_scale=1.0 if amplify == "grad" else w,
            )  # fmt: skip
    return p


@pytest.mark.parametrize("amplify", ["grad", "update"])
def test_step_equals_per_expert_reference(backend, device, amplify):
    model, _, plan = expert_plan(device=device)
    starts = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    grads = {
        n: [torch.randn(p.shape, generator=g).to(device) for _ in range(3)]
        for n, p in starts.items()
    }
    opt = SAUAdamW(
        model.parameters(), plan=plan, lr=1e-2, weight_decay=0.1, amplify=amplify, backend=backend
    )
    for i in range(3):
        for n, p in model.named_parameters():
            p.grad = grads[n][i].clone()
        opt.step()
    for n, p in model.named_parameters():
        want = masked_reference(starts[n], grads[n], plan, n, amplify, wd=0.1)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
        unselected = torch.ones(p.numel(), dtype=torch.bool, device=device)
        unselected[plan[n].selection.index.long()] = False
        assert torch.equal(p.detach().view(-1)[unselected], starts[n].view(-1)[unselected])
    assert torch.equal(model.layers[0].down_proj[1], starts["layers.0.down_proj"][1])


def test_expert_state_round_trips_and_bad_segments_refused():
    model, _, plan = expert_plan()
    opt = SAUAdamW(model.parameters(), plan=plan, lr=1e-2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[model.layers[0].gate_up_proj]
    assert isinstance(state["amplification"], tuple) and len(state["amplification"]) == E
    sd = opt.state_dict()
    fresh = SAUAdamW(model.parameters(), plan=None, lr=1e-2)
    fresh.load_state_dict(sd)
    assert fresh.state[model.layers[0].gate_up_proj]["amplification"] == state["amplification"]
    bad = opt.state_dict()
    bad["state"][0] = dict(bad["state"][0], amplification=((1, 1.0), (0, 1.0)))
    with pytest.raises(ValueError, match="per-expert amplification"):
        fresh.load_state_dict(bad)


def test_saliency_amplify_on_experts_uses_per_expert_codes(backend, device):
    model, _, plan = expert_plan(device=device)
    starts = {n: p.detach().clone() for n, p in model.named_parameters()}
    for layer in plan.values():
        assert layer.entry_scale.dtype == torch.uint8
        assert layer.entry_scale.numel() == layer.selection.n_selected
    opt = SAUAdamW(model.parameters(), plan=plan, lr=1e-2, amplify="saliency", backend=backend)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in model.named_parameters():
        moved = (p.detach() != starts[n]).view(-1)
        chosen = torch.zeros_like(moved)
        chosen[plan[n].selection.index.long()] = True
        assert torch.equal(moved, chosen)
