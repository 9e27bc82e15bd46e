"""SAUAdamW's backward hooks: compact_grads, clip_grad_norm_, remove_hooks and ownership."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from sau import SAUAdamW, plan_selection


def model_and_plan(dtype=torch.float32, seed=0):
    """A two-Linear model, 50% magnitude-pruned, with a k = 0.3 plan on both weights."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():  # every value from `gen`: two calls build the same model
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
            layer.weight[layer.weight.abs() < layer.weight.abs().median()] = 0
    model.to(dtype)
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    saliency = {n: torch.rand(p.shape, generator=gen) for n, p in named}
    return model, plan_selection(named, saliency, k=0.3)


def train(model, opt, *, steps=3, accumulate=1, clip=None, dtype=torch.float32):
    """`steps` optimizer steps of `accumulate` backwards each; returns the clip norms."""
    gen = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x = torch.randn(16, 32, generator=gen).to(dtype)
            model(x).float().pow(2).mean().backward()
        if clip is not None:
            norms.append(opt.clip_grad_norm_(clip))
        opt.step()
    return norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate,clip", [(1, None), (4, None), (4, 0.01)])
def test_compact_grads_equal_the_normal_mode(dtype, accumulate, clip, backend):
    """grad[G] is kept in the gradient's dtype and summed as autograd sums .grad, so the
    result is bitwise the normal mode's, with accumulation and clipping too (the clip norm
    is over the same entries: G of planned weights, all of dense ones)."""
    runs = []
    for compact in (False, True):
        model, plan = model_and_plan(dtype)
        opt = SAUAdamW(model.parameters(), plan=plan, lr=1e-2, amplify="update",
                       compact_grads=compact, backend=backend)  # fmt: skip
        norms = train(model, opt, accumulate=accumulate, clip=clip, dtype=dtype)
        runs.append(([p.detach() for p in model.parameters()], norms, opt))
    (normal, n_norms, _), (compact, c_norms, opt) = runs
    for a, b in zip(normal, compact):
        assert torch.equal(a, b)
    assert [float(n) for n in n_norms] == [float(n) for n in c_norms]
    if clip is not None:
        assert all(float(n) > clip for n in c_norms)  # the clip did act
    assert opt._compact == {}  # consumed by step()


def test_dense_gradients_die_in_backward():
    """With compact_grads, at most the gradient autograd is finishing (one weight) plus
    the compact buffers is alive: each planned weight's dense .grad is freed in its hook."""
    model, plan = model_and_plan()
    planned = [layer.param for layer in plan.values()]
    opt = SAUAdamW(model.parameters(), plan=plan, compact_grads=True)
    alive = []

    def count(_p):  # runs after SAUAdamW's hook on the same parameter
        alive.append(sum(q.grad is not None for q in planned))

    for p in planned:
        p.register_post_accumulate_grad_hook(count)
    model(torch.randn(4, 32)).sum().backward()
    assert alive == [0, 0]
    kept = sum(buf.numel() * buf.element_size() for buf in opt._compact.values())
    assert kept == sum(layer.selection.index.numel() * 4 for layer in plan.values())
    opt.zero_grad()
    assert opt._compact == {}  # zero_grad drops kept gradients too


def test_a_second_hooking_optimizer_is_refused_until_the_first_is_released():
    model, plan = model_and_plan()
    first = SAUAdamW(model.parameters(), plan=plan, in_backward=True)
    with pytest.raises(ValueError, match="already hooked by another SAUAdamW") as err:
        SAUAdamW(model.parameters(), plan=plan, compact_grads=True)
    assert "\n" not in str(err.value)
    first.remove_hooks()
    second = SAUAdamW(model.parameters(), plan=plan, in_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 32)).sum().backward()  # second steps alone; first is detached
    second.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(not st for st in first.state.values())
    assert first.in_backward is False  # first now works in the normal mode


def test_garbage_collection_releases_the_hooks():
    model, plan = model_and_plan()
    opt = SAUAdamW(model.parameters(), plan=plan, in_backward=True)
    del opt
    gc.collect()
    plain = SAUAdamW(model.parameters(), plan=plan)  # normal mode: steps on .grad
    model(torch.randn(4, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # no stale hook ate them
    other = SAUAdamW(model.parameters(), plan=plan, compact_grads=True)  # not refused
    assert other is not None and plain is not None


def test_in_backward_refuses_clipping_and_compact_with_in_backward_is_refused():
    model, plan = model_and_plan()
    opt = SAUAdamW(model.parameters(), plan=plan, in_backward=True)
    with pytest.raises(RuntimeError, match="cannot clip"):
        opt.clip_grad_norm_(1.0)
    opt.remove_hooks()
    with pytest.raises(ValueError, match="exclude each other"):
        SAUAdamW(model.parameters(), plan=plan, in_backward=True, compact_grads=True)


def test_clip_norm_counts_only_applied_entries():
    """The norm is over grad[G] of planned weights (plus dense gradients): smaller than a
    dense clip over the same parameters; bad max_norm / norm_type refused."""
    model, plan = model_and_plan()
    opt = SAUAdamW([layer.param for layer in plan.values()], plan=plan)
    model(torch.randn(4, 32)).sum().backward()
    expected = torch.cat(
        [layer.param.grad.view(-1)[layer.selection.index.long()] for layer in plan.values()]
    ).norm()
    dense = torch.cat([layer.param.grad.view(-1) for layer in plan.values()]).norm()
    assert torch.allclose(opt.clip_grad_norm_(1e9), expected) and float(expected) < float(dense)
    assert float(opt.clip_grad_norm_(1e9, norm_type=float("inf"))) == float(
        max(float(layer.param.grad.view(-1)[layer.selection.index.long()].abs().max())
            for layer in plan.values())
    )  # fmt: skip
    with pytest.raises(ValueError):
        opt.clip_grad_norm_(-1.0)
    with pytest.raises(ValueError, match="norm_type"):
        opt.clip_grad_norm_(1.0, norm_type=1.0)
