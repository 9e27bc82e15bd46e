"""SAUAdamW under wrappers that rewrite its param groups: DeepSpeed ZeRO-1/2/3 (simulated:
each group's parameters replaced by one flat tensor) is refused with one line before any
weight changes; ZeRO-0 (groups rebuilt around the same tensors) keeps working."""

from __future__ import annotations

import pytest
import torch

from sau import SAUAdamW, plan_selection
from tests.helpers import pruned_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _model_and_plan(seed: int = 0):
    model = pruned_mlp(torch.float32, seed=seed)
    saliency = {n: p.detach().abs() + 1.0 for n, p in model.named_parameters() if p.dim() == 2}
    return model, plan_selection(model.named_parameters(), saliency, k=0.3)


def _loss(model) -> torch.Tensor:
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    return model(x).pow(2).mean()


def _flatten_groups_like_zero(opt: torch.optim.Optimizer) -> torch.Tensor:
    """What ZeRO does after the optimizer is built: one flat fp32 buffer of every param
    takes the place of the group's list (each rank then steps its partition of it)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    flat = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_()
    flat.grad = torch.cat([p.grad.reshape(-1) for p in params])
    opt.param_groups[0]["params"] = [flat]
    for group in opt.param_groups[1:]:
        group["params"] = []
    return flat


@pytest.mark.parametrize("compact_grads", [False, True])
def test_zero_flat_groups_are_refused_before_any_update(compact_grads):
    model, plan = _model_and_plan()
    opt = SAUAdamW(model.parameters(), plan=plan, lr=1e-2, compact_grads=compact_grads)
    _loss(model).backward()
    if compact_grads:  # the hooks kept grad[G]; ZeRO would flatten the .grads it sees
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    before = [p.detach().clone() for p in model.parameters()]
    flat = _flatten_groups_like_zero(opt)
    flat_before = flat.detach().clone()
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert "\n" not in message
    assert "DeepSpeed ZeRO-1/2/3" in message and "FSDP2" in message
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert torch.equal(flat.detach(), flat_before) and not opt.state


def test_zero_is_refused_inside_backward_before_any_update():
    model, plan = _model_and_plan()
    opt = SAUAdamW(model.parameters(), plan=plan, lr=1e-2, in_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["params"] = [torch.cat([p.detach().reshape(-1) for p in before])]
    with pytest.raises(RuntimeError, match="DeepSpeed ZeRO-1/2/3"):
        _loss(model).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_group_that_lost_only_its_planned_tensors_is_refused():
    model, plan = _model_and_plan()
    opt = SAUAdamW(model.parameters(), plan=plan, lr=1e-2)
    _loss(model).backward()
    opt.param_groups[0]["params"] = [p for p in model.parameters() if p.dim() == 1]
    with pytest.raises(RuntimeError, match="per-tensor plan cannot index"):
        opt.step()


def _run(rebuild_groups: bool, steps: int = 3) -> list[torch.Tensor]:
    model, plan = _model_and_plan()
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() == 1]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = SAUAdamW(groups, plan=plan, lr=1e-2)
    for step in range(steps):
        _loss(model).backward()
        if rebuild_groups and step == 1:  # ZeRO-0 and accelerate: new lists, same tensors
            for group in opt.param_groups:
                group["params"] = list(reversed(group["params"]))
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_groups_rebuilt_around_the_same_tensors_keep_working():
    assert all(torch.equal(a, b) for a, b in zip(_run(True), _run(False)))
