"""SAUAdamW.load_state_dict on hostile state: whatever is loaded, no pruned entry moves,
and a state the step cannot use is refused at load (one clear error, state kept)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sau import SAUAdamW, plan_selection

SHAPE = (80, 128)  # 10,240 entries, half of them pruned


def weight(pruned: bool = True) -> nn.Parameter:
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    if pruned:
        w[w.abs() <= w.abs().median()] = 0
    return nn.Parameter(w)


def saliency() -> dict:
    return {"w": torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))}


def planned(w: nn.Parameter, k: float = 0.3, **kw) -> SAUAdamW:
    return SAUAdamW([w], plan=plan_selection([("w", w)], saliency(), k=k), lr=1e-2, **kw)


def steps(w: nn.Parameter, opt: SAUAdamW, n: int) -> None:
    gen = torch.Generator().manual_seed(2)
    for _ in range(n):
        w.grad = torch.randn(SHAPE, generator=gen)
        opt.step()


def state_of_a_run(pruned: bool = True, k: float = 0.3) -> dict:
    w = weight(pruned)
    opt = planned(w, k)
    steps(w, opt, 1)
    return copy.deepcopy(opt.state_dict())


def test_a_state_of_another_plan_on_the_unpruned_model_is_refused():
    # Before: loaded (range and order were fine), and 2 steps made 4,592 of the 5,120
    # pruned entries non-zero.
    sd = state_of_a_run(pruned=False, k=0.9)
    w = weight()
    opt = planned(w)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"selects \d+ of \d+ entries whose weight is exactly 0"):
        opt.load_state_dict(sd)
    assert not opt.state  # nothing loaded
    steps(w, opt, 2)
    assert torch.equal(w.detach()[before == 0], before[before == 0])  # pruned stay 0


def test_the_check_holds_without_a_plan_too():
    # The documented plan-less resume: the state's index is used, so it is checked too.
    opt = SAUAdamW([weight()], lr=1e-2)
    with pytest.raises(ValueError, match="exactly 0"):
        opt.load_state_dict(state_of_a_run(pruned=False, k=0.9))
    opt.load_state_dict(state_of_a_run())  # the run's own state loads


def test_a_dense_state_for_a_planned_weight_is_refused():
    sd = state_of_a_run()
    st = sd["state"][0]
    for key in ("index", "amplification"):
        del st[key]
    st["exp_avg"], st["exp_avg_sq"] = torch.zeros(SHAPE), torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="dense state"):
        planned(weight()).load_state_dict(sd)


def test_a_state_of_the_same_model_with_another_k_still_resumes():
    # The run's index wins over a plan recomputed elsewhere (e.g. on another number of
    # ranks, where ties at the threshold may fall the other way): it selects no pruned
    # entry, so it loads and steps only its own entries.
    sd = state_of_a_run(k=0.3)
    w = weight()
    opt = planned(w, k=0.1)
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[w]["index"], sd["state"][0]["index"])
    before = w.detach().clone()
    steps(w, opt, 2)
    assert torch.equal(w.detach()[before == 0], before[before == 0])


def _edit(sd: dict, where: str, key: str, value) -> dict:
    target = sd["state"][0] if where == "state" else sd["param_groups"][0]
    target[key] = value
    return sd


@pytest.mark.parametrize(
    ("where", "key", "value", "match"),
    [
        # Before: each of these loaded, then the steps wrote NaN into the weights or
        # raised ZeroDivisionError / AttributeError mid-run.
        ("state", "exp_avg", torch.full((3072,), float("nan")), "NaN"),
        ("state", "exp_avg_sq", torch.full((3072,), -1.0), "negative"),
        ("state", "step", torch.tensor(-1.0), "step must be a whole number"),
        ("state", "step", torch.tensor(float("nan")), "step must be a whole number"),
        ("state", "step", torch.tensor(2.5), "step must be a whole number"),
        ("state", "step", "3", "step must be a whole number"),
        ("group", "lr", float("nan"), "lr"),
        ("group", "lr", -1.0, "lr"),
        ("group", "betas", (1.0, 1.0), "beta1"),
        ("group", "betas", (0.9,), "betas must be a pair"),
        ("group", "eps", float("inf"), "eps"),
        ("group", "weight_decay", -0.1, "weight_decay"),
        ("group", "amplify", "bogus", "amplify"),
        ("group", "rounding", "up", "rounding"),
        ("group", "state_bits", 4, "state_bits"),
        ("group", "seed", -1, "seed"),
    ],
)
def test_an_unusable_state_is_refused_at_load_and_ours_kept(where, key, value, match):
    sd = state_of_a_run()
    n = sd["state"][0]["index"].numel()
    if isinstance(value, torch.Tensor) and value.dim():
        value = value[:1].expand(n).clone()  # one value per selected entry
    w = weight()
    opt = planned(w)
    steps(w, opt, 1)
    kept = copy.deepcopy(opt.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(_edit(sd, where, key, value))
    now = opt.state_dict()
    assert now["param_groups"] == kept["param_groups"]
    assert all(torch.equal(now["state"][0][k], kept["state"][0][k]) for k in ("index", "exp_avg"))


def test_a_state_dict_without_state_is_refused():
    # Before: KeyError('state').
    sd = state_of_a_run()
    with pytest.raises(ValueError, match="needs 'state' and 'param_groups'"):
        planned(weight()).load_state_dict({"param_groups": sd["param_groups"]})


# SAUAdamW caches each planned parameter's segment views (slices of its state) across
# steps; whatever replaces what they were made of, the next step must be a fresh
# optimizer's, to the bit.
EXPERTS = (4, 8, 16)  # a fused experts tensor: one segment per expert
MATRIX = (16, 24)


def cached_model() -> list[nn.Parameter]:
    """A float32 fused experts tensor, a float32 matrix (one launch with it: the layout
    holds their relative addresses) and a bfloat16 matrix, all pruned by half."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for shape, dtype in (
        (EXPERTS, torch.float32), (MATRIX, torch.float32), (MATRIX, torch.bfloat16),
    ):  # fmt: skip
        w = torch.randn(shape, generator=gen)
        w[w.abs() <= w.abs().median()] = 0
        out.append(nn.Parameter(w.to(dtype)))
    return out


def cached_opt(params: list[nn.Parameter], backend: str) -> SAUAdamW:
    gen = torch.Generator().manual_seed(4)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    sal = {n: torch.rand(p.shape, generator=gen) for n, p in named}
    plan = plan_selection(named, sal, k=0.5, alpha=1.0)
    return SAUAdamW(params, plan=plan, lr=1e-2, backend=backend)


def grads_step(params: list[nn.Parameter], opt: SAUAdamW, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()


def replace_load(params, opt, backend) -> None:
    """load_state_dict of another run's state (new tensors, other values)."""
    other = cached_model()
    other_opt = cached_opt(other, backend)
    for seed in (20, 21, 22):
        grads_step(other, other_opt, seed)
    opt.load_state_dict(copy.deepcopy(other_opt.state_dict()))


def replace_data(params, opt, backend) -> None:
    """p.data swapped for a copy at another address (the old one freed)."""
    for p in params:
        p.data = p.data.clone()


def replace_lr(params, opt, backend) -> None:
    opt.param_groups[0]["lr"] = 3e-2


def replace_state_tensor(params, opt, backend) -> None:
    """A state tensor swapped by hand (the old one kept alive elsewhere)."""
    state = opt.state[params[0]]
    replace_state_tensor.kept = state["exp_avg"]
    state["exp_avg"] = state["exp_avg"].clone()


def replace_rounding(params, opt, backend) -> None:
    """kahan -> stochastic drops the compensation codes; back to kahan makes new (zero)
    ones, which the views cached at the stochastic step do not hold."""
    opt.param_groups[0]["rounding"] = "stochastic"
    grads_step(params, opt, 30)
    opt.param_groups[0]["rounding"] = "kahan"


def bits(p: torch.Tensor) -> torch.Tensor:
    """A parameter's bit pattern (NaN-safe, -0 != +0)."""
    return p.detach().view(torch.int32 if p.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize(
    "replace",
    [replace_load, replace_data, replace_lr, replace_state_tensor, replace_rounding],
    ids=lambda f: f.__name__,
)
def test_the_step_after_a_replacement_is_a_fresh_optimizers(replace, backend):
    params = cached_model()
    opt = cached_opt(params, backend)
    for seed in (10, 11):  # the cache is built and used
        grads_step(params, opt, seed)
    replace(params, opt, backend)
    fresh_params = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = cached_opt(fresh_params, backend)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for seed in (12, 13):
        grads_step(params, opt, seed)
        grads_step(fresh_params, fresh, seed)
        for p, q in zip(params, fresh_params):
            assert torch.equal(bits(p), bits(q))
            for key, value in opt.state[p].items():
                other = fresh.state[q][key]
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other), key
                else:
                    assert value == other, key
