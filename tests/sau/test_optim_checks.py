"""Check once: SAUAdamW validates hyper-parameters and its plan at construction and a
state_dict when it is loaded, and its step runs the unchecked kernel core (a refused step
changes no state); dense_adamw_ never reads a device value on the host."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sau_kernels.adamw as kernel_adamw
from sau import SAUAdamW, plan_selection
from sau.optim import dense_adamw_


def _layer(param, index, w=1.5):
    return SimpleNamespace(param=param, selection=SimpleNamespace(index=index), amplification=w)


@pytest.mark.parametrize(
    "index, w, error, match",
    [
        (torch.tensor([0.0, 1.0]), 1.5, TypeError, "int32 or int64"),
        (torch.tensor([[0, 1]]), 1.5, ValueError, "1-D"),
        (torch.tensor([0, 12], dtype=torch.int32), 1.5, IndexError, "out of range"),
        (torch.tensor([-1, 2], dtype=torch.int32), 1.5, IndexError, "out of range"),
        (torch.tensor([3, 1], dtype=torch.int32), 1.5, ValueError, "strictly increasing"),
        (torch.tensor([1, 1], dtype=torch.int32), 1.5, ValueError, "more than once"),
        (torch.tensor([1, 2], dtype=torch.int32), float("nan"), ValueError, "amplification"),
        (torch.tensor([1, 2], dtype=torch.int32), -1.0, ValueError, "amplification"),
    ],
)
def test_bad_plan_fails_at_construction(index, w, error, match):
    p = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(error, match=match) as info:
        SAUAdamW([p], plan={"w": _layer(p, index, w)})
    assert "plan['w']" in str(info.value)


def test_an_empty_plan_is_refused_not_taken_for_no_plan():
    # plan={} must not fall back to a dense AdamW that moves every pruned weight.
    p = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="plan is empty"):
        SAUAdamW([p], plan={})


@pytest.mark.parametrize(
    "group, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "beta2"),
    ],
)
def test_bad_param_group_fails_at_construction(group, match):
    good = nn.Parameter(torch.zeros(2))
    bad = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=match):
        SAUAdamW([{"params": [good]}, {"params": [bad], **group}], lr=1e-3)


def test_step_runs_no_argument_check(monkeypatch):
    """After construction the per-step core trusts its caller: poisoning every check the
    public masked_adamw_ runs changes nothing, and the result equals masked_adamw_'s."""
    torch.manual_seed(0)
    w = torch.randn(8, 9)
    w[w.abs() < 0.5] = 0
    p = nn.Parameter(w.clone())
    plan = plan_selection([("w", p)], {"w": torch.rand(8, 9)}, k=0.5, alpha=1.0)
    opt = SAUAdamW([p], plan=plan, lr=1e-2, weight_decay=0.1, amplify="update")

    def forbidden(*args, **kwargs):
        raise AssertionError("a per-step check ran")

    for name in ("check_scalar", "check_float", "check_index_values", "check_same_device"):
        monkeypatch.setattr(kernel_adamw, name, forbidden)
    grads = [torch.randn(8, 9) for _ in range(3)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    monkeypatch.undo()

    # The same three steps through the checked public function.
    q = w.clone()
    index = plan["w"].selection.index
    m, v = torch.zeros(index.numel()), torch.zeros(index.numel())
    amp = plan["w"].amplification
    for t, g in enumerate(grads, 1):
        kernel_adamw.masked_adamw_(
            q, g, m, v, index, step=t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.1, update_scale=amp,
        )  # fmt: skip
    assert torch.equal(p.detach(), q)
    assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["exp_avg_sq"], v)


def test_step_refuses_a_param_made_non_contiguous():
    p = nn.Parameter(torch.randn(4, 6))
    plan = plan_selection([("w", p)], {"w": torch.rand(4, 6)}, k=0.5)
    opt = SAUAdamW([p], plan=plan)
    p.data = p.data.t()  # same identity, now a non-contiguous view
    p.grad = torch.randn(6, 4)
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()
    assert float(opt.state[p]["step"]) == 0  # a refused step does not count


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
        (lambda st: {"nonfinite": torch.zeros(())}, TypeError, "nonfinite"),
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


def test_state_without_skip_counter_is_refused_at_load():
    # Every step counts skipped entries into "nonfinite": a state without it is refused
    # at load instead of failing at the next step.
    w, opt = planned((8, 8))
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["nonfinite"]
    twin = SAUAdamW([nn.Parameter(w.detach().clone())], lr=1e-2)
    with pytest.raises(ValueError, match="missing nonfinite"):
        twin.load_state_dict(sd)
    assert not twin.state


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


class _NoHostRead:
    """Make every way of reading a tensor's value on the host raise (a device sync)."""

    def __init__(self, monkeypatch):
        def forbidden(self, *args, **kwargs):
            raise AssertionError("dense_adamw_ read a device value on the host")

        for name in ("__bool__", "item", "__int__", "__float__", "tolist", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, forbidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_step_reads_nothing_on_the_host_and_skips_per_entry(monkeypatch, dtype):
    torch.manual_seed(0)
    param = torch.randn(5, 7).to(dtype)
    grad = torch.randn(5, 7).to(dtype)
    grad[1, 2], grad[4, 6] = float("nan"), float("-inf")
    m, v = torch.randn(5, 7) * 0.1, torch.rand(5, 7) * 0.01
    before = param.clone(), m.clone(), v.clone()
    count = torch.zeros((), dtype=torch.int64)
    hp = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)

    # The oracle: torch's single-tensor AdamW on the finite entries (float32 math).
    ref_p, ref_m, ref_v = param.float().clone(), m.clone(), v.clone()
    finite = torch.isfinite(grad)
    g = torch.where(finite, grad.float(), 0.0)
    ref_p.mul_(1 - hp["lr"] * hp["weight_decay"])
    ref_m.lerp_(g, 1 - hp["beta1"])
    ref_v.mul_(hp["beta2"]).addcmul_(g, g, value=1 - hp["beta2"])
    denom = (ref_v.sqrt() / (1 - hp["beta2"] ** 3) ** 0.5).add_(hp["eps"])
    ref_p.addcdiv_(ref_m, denom, value=-hp["lr"] / (1 - hp["beta1"] ** 3))

    with monkeypatch.context() as mp:
        _NoHostRead(mp)
        dense_adamw_(param, grad, m, v, **hp, nonfinite_count=count)
    assert int(count) == 2
    bad = ~finite
    assert torch.equal(param[bad], before[0][bad])
    assert torch.equal(m[bad], before[1][bad]) and torch.equal(v[bad], before[2][bad])
    assert torch.equal(param[finite], ref_p.to(dtype)[finite])
    assert torch.equal(m[finite], ref_m[finite]) and torch.equal(v[finite], ref_v[finite])


@pytest.mark.gpu
def test_sauadamw_step_does_not_sync_on_cuda():
    dev = torch.device("cuda")
    w = torch.randn(64, 48, device=dev)
    w[w.abs() < 0.6] = 0
    planned, dense = nn.Parameter(w), nn.Parameter(torch.randn(33, device=dev))
    plan = plan_selection([("w", planned)], {"w": torch.rand(64, 48, device=dev)}, k=0.3)
    opt = SAUAdamW([planned, dense], plan=plan, lr=1e-3, weight_decay=0.1)
    for p in (planned, dense):
        p.grad = torch.randn_like(p)
    opt.step()  # the first step allocates state (and may sync); later ones must not
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
