"""SAUAdamW(in_backward=True): the step inside backward, bitwise equal to the normal mode."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.distributed.fsdp import fully_shard

from sau import SAUAdamW, plan_selection
from tests.helpers import DeepProbeNet, pruned_mlp
from tests.multiproc import run_ranks

PLANNED = ("0.weight", "2.weight")  # biases stay outside the plan: dense AdamW


def make_opt(model, in_backward, backend, saliency=None):
    """SAUAdamW with a plan over PLANNED (w > 1), weight decay, and a LambdaLR schedule."""
    sal = saliency or {
        n: torch.rand(p.shape, generator=torch.Generator().manual_seed(7))
        for n, p in model.named_parameters()
        if n in PLANNED
    }
    plan = plan_selection(model.named_parameters(), sal, alpha=2.0)
    opt = SAUAdamW(
        model.parameters(),
        plan=plan,
        lr=1e-2,
        weight_decay=0.1,
        amplify="update",
        backend=backend,
        in_backward=in_backward,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    return opt, sched, sal


def train_step(model, opt, sched, t):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(4, 16, generator=g).to(next(model.parameters()).dtype)
    opt.zero_grad()
    model(x).float().pow(2).mean().backward()
    opt.step()
    sched.step()


def assert_same(model_a, opt_a, model_b, opt_b):
    """Every parameter and every state tensor bitwise equal (dtype included)."""
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), name
        a, b = opt_a.state[p], opt_b.state[q]
        assert a.keys() == b.keys(), name
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == b[key].dtype and torch.equal(value, b[key]), (name, key)
            else:
                assert value == b[key], (name, key)


def reload(model, opt, in_backward, backend):
    """A fresh model copy and a fresh optimizer loaded from `opt`'s saved state_dict."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = copy.deepcopy(model)
    twin_opt = SAUAdamW(twin.parameters(), lr=1e-2, backend=backend, in_backward=in_backward)
    twin_sched = torch.optim.lr_scheduler.LambdaLR(twin_opt, lambda t: 1.0 / (1 + t))
    twin_opt.load_state_dict(torch.load(buf, weights_only=True))  # after the scheduler
    return twin, twin_opt, twin_sched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_equal_to_normal_mode_across_a_checkpoint(dtype, backend):
    normal = pruned_mlp(dtype)
    inside = copy.deepcopy(normal)
    opt_n, sched_n, sal = make_opt(normal, False, backend)
    opt_i, sched_i, _ = make_opt(inside, True, backend, sal)
    start = {n: p.detach().clone() for n, p in normal.named_parameters()}
    for t in range(12):
        if t == 6:
            # Save mid-run and resume in the other mode, both ways: the state is shared.
            normal, opt_n, sched_n = reload(normal, opt_n, False, backend)
            inside, opt_i, sched_i = reload(inside, opt_i, True, backend)
            crossed, opt_c, sched_c = reload(inside, opt_i, False, backend)
        train_step(normal, opt_n, sched_n, t)
        train_step(inside, opt_i, sched_i, t)
        assert all(p.grad is None for p in inside.parameters())
        assert_same(normal, opt_n, inside, opt_i)
        if t >= 6:
            train_step(crossed, opt_c, sched_c, t)
            assert_same(normal, opt_n, crossed, opt_c)
    # The schedule acted, identically in both modes.
    assert opt_i.param_groups[0]["lr"] == opt_n.param_groups[0]["lr"] < 1e-2 / 5
    for name, p in normal.named_parameters():
        assert not torch.equal(p.detach(), start[name]), name  # every tensor moved
        if name in PLANNED:
            assert (p.detach()[start[name] == 0] == 0).all()  # pruned entries stay zero


def test_second_backward_before_step_raises():
    model = pruned_mlp(torch.float32)
    control = copy.deepcopy(model)
    opt, _, sal = make_opt(model, True, "torch")
    x = torch.randn(4, 16)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        model(x).sum().backward()
    # The normal mode accumulates the two gradients without complaint (the control).
    opt_c, _, _ = make_opt(control, False, "torch", sal)
    control(x).sum().backward()
    control(x).sum().backward()
    opt_c.step()


def test_a_grad_the_hooks_never_saw_raises_at_step():
    model = pruned_mlp(torch.float32)
    opt, _, _ = make_opt(model, True, "torch")
    model[0].bias.grad = torch.ones_like(model[0].bias)
    with pytest.raises(RuntimeError, match="never consumed"):
        opt.step()


def test_step_without_backward_changes_nothing_and_closure_steps():
    model = pruned_mlp(torch.float32)
    opt, _, _ = make_opt(model, True, "torch")
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()  # harmless: there is no gradient to drop
    assert opt.step() is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.state_nbytes() == 0

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(2, 16)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.grad_fn is not None  # the closure ran with grad enabled
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(int(opt.state[p]["step"]) == 1 for p in model.parameters())
    opt.step(closure)  # the next step's backward is allowed: step() closed the last one
    assert all(int(opt.state[p]["step"]) == 2 for p in model.parameters())


def test_deepcopy_steps_its_own_parameters():
    model = pruned_mlp(torch.float32)
    opt, sched, _ = make_opt(model, True, "torch")
    model2, opt2 = copy.deepcopy((model, opt))
    before = [p.detach().clone() for p in model.parameters()]
    model2(torch.ones(2, 16)).sum().backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(not torch.equal(p, b) for p, b in zip(model2.parameters(), before))
    assert all(p.grad is None for p in model2.parameters())
    opt2.step()
    assert not opt.state and len(opt2.state) == 4


def test_live_gradient_bytes_bounded_by_one_layer():
    torch.manual_seed(0)
    model = DeepProbeNet()
    x = torch.randn(4, 64)
    one_layer = (64 * 64 + 64) * 4  # weight + bias, float32

    # Control: the normal mode keeps every finished gradient alive until step().
    normal = SAUAdamW(model.parameters(), lr=1e-3)
    model(x).backward()
    plain_peak = model.peak
    normal.zero_grad(set_to_none=True)
    assert plain_peak >= 6 * one_layer

    inside_model = copy.deepcopy(model)
    inside_model.peak = 0
    opt = SAUAdamW(inside_model.parameters(), lr=1e-3, in_backward=True)
    inside_model(x).backward()
    opt.step()
    assert 0 < len(opt.state)
    assert inside_model.peak <= one_layer
    assert all(p.grad is None for p in inside_model.parameters())


def test_in_backward_under_fsdp2_matches_normal_mode():
    run_ranks(_fsdp2_worker, 2)


def _fsdp2_worker(rank: int, world: int) -> None:
    """Both modes on a 2-rank FSDP2 model; full params must be bitwise equal."""
    models, opts = [], []
    for in_backward in (False, True):
        model = pruned_mlp(torch.float32)
        sal = {
            n: torch.rand(p.shape, generator=torch.Generator().manual_seed(7))
            for n, p in model.named_parameters()
            if n in PLANNED
        }
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        plan = plan_selection(model.named_parameters(), sal, alpha=2.0)
        opts.append(SAUAdamW(model.parameters(), plan=plan, lr=1e-2, in_backward=in_backward))
        models.append(model)
    for t in range(4):
        g = torch.Generator().manual_seed(100 * t + rank)  # each rank its own batch
        x = torch.randn(4, 16, generator=g)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor())
