"""SAUAdamW.load_state_dict validates what it loads; a refused step changes no state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sau import SAUAdamW, plan_selection


def planned(shape=(4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(shape, generator=g))
    plan = plan_selection([("w", w)], {"w": torch.rand(shape, generator=g)}, k=0.5)
    opt = SAUAdamW([w], plan=plan, lr=1e-2)
    w.grad = torch.randn(shape, generator=g)
    opt.step()
    return w, opt


def test_state_of_a_larger_weight_is_refused_at_load():
    # Before: the 64x64 index loaded into a 4x4 weight and every (unchecked) step wrote
    # past the tensor's end (heap corruption under the Triton interpreter).
    _, big = planned((64, 64))
    w, opt = planned((4, 4))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(IndexError, match="out of range for a tensor of 16"):
        opt.load_state_dict(big.state_dict())
    assert torch.equal(opt.state[w]["index"], before["state"][0]["index"])


@pytest.mark.parametrize(
    ("edit", "exc", "match"),
    [
        (lambda st: {"index": st["index"].float()}, TypeError, "int32 or int64"),
        (lambda st: {"index": st["index"].flip(0)}, ValueError, "strictly increasing"),
        (lambda st: {"index": st["index"].clone().fill_(3)}, ValueError, "more than once"),
        (lambda st: {"index": st["index"] - 1}, IndexError, "holds -1"),
        (lambda st: {"exp_avg": st["exp_avg"][:-1]}, ValueError, "one entry per index"),
        (lambda st: {"amplification": float("nan")}, ValueError, "amplification"),
        (lambda st: {"exp_avg_sq": None}, TypeError, "float tensors"),
    ],
)
def test_bad_loaded_state_is_refused(edit, exc, match):
    w, opt = planned((8, 8))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0].update(edit(sd["state"][0]))
    fresh = SAUAdamW([nn.Parameter(w.detach().clone())], lr=1e-2)
    with pytest.raises(exc, match=match):
        fresh.load_state_dict(sd)


def test_plain_torch_adamw_state_is_refused_with_a_clear_message():
    # Before: accepted, then KeyError: 'nonfinite' at the next step.
    w = nn.Parameter(torch.randn(4, 4))
    adamw = torch.optim.AdamW([w])
    w.grad = torch.ones(4, 4)
    adamw.step()
    opt = SAUAdamW([w], lr=1e-2)
    with pytest.raises(ValueError, match="not a SAUAdamW state_dict.*torch.optim.AdamW"):
        opt.load_state_dict(adamw.state_dict())


def test_state_without_skip_counter_still_loads_and_steps():
    w, opt = planned((8, 8))
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["nonfinite"]
    twin = SAUAdamW([nn.Parameter(w.detach().clone())], lr=1e-2)
    twin.load_state_dict(sd)
    twin.param_groups[0]["params"][0].grad = torch.ones(8, 8)
    twin.step()
    assert twin.nonfinite_count() == 0


def test_refused_non_contiguous_step_does_not_count():
    # Before: state["step"] was incremented, then the kernel refused the param.
    base = torch.randn(8, 8)
    w = nn.Parameter(base)
    plan = plan_selection([("w", w)], {"w": torch.rand(8, 8)}, k=0.5)
    opt = SAUAdamW([w], plan=plan, lr=1e-2)
    w.grad = torch.ones(8, 8)
    opt.step()
    assert int(opt.state[w]["step"]) == 1
    w.data = torch.randn(8, 16)[:, ::2]  # same shape, not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()
    assert int(opt.state[w]["step"]) == 1
