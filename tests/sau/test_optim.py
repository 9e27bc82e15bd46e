"""SAUAdamW against torch.optim.AdamW, its state, checkpoints and non-finite policy."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from sau import SAUAdamW, plan_selection
from tests.helpers import pruned_mlp

# (atol, rtol) per (backend, dtype) for params and for the float32 moments.
# torch, fp32: the same float32 operations as torch.optim.AdamW, so 1e-6 relative.
# torch, bf16: one unit in the last place (8 significand bits); the oracle rounds its fp32
#   master to bf16 after every step exactly as the kernel stores the param.
# triton (CPU interpreter, numpy): no fused multiply-add, while torch's CPU lerp_ fuses;
#   m differs by one rounding of (1 - beta1) * (g - m), i.e. ~1 ulp of g (|g| <= ~30).
TOL = {
    ("torch", torch.float32): dict(param=(0.0, 1e-6), moment=(0.0, 1e-6)),
    ("torch", torch.bfloat16): dict(param=(0.0, 2**-8), moment=(0.0, 1e-6)),
    ("triton", torch.float32): dict(param=(1e-6, 1e-5), moment=(4e-6, 1e-5)),
    ("triton", torch.bfloat16): dict(param=(0.0, 2**-8), moment=(4e-6, 1e-5)),
    # fp16: 11 significand bits, so one unit in the last place is 2**-11 relative.
    ("torch", torch.float16): dict(param=(0.0, 2**-11), moment=(0.0, 1e-6)),
    ("triton", torch.float16): dict(param=(0.0, 2**-11), moment=(4e-6, 1e-5)),
}
SHAPES = {"a": (17, 33), "b": (63,), "c": (1, 1), "d": (5, 4)}
ALPHA = 2.0  # large enough that every layer's w is well above 1


def make_params(dtype=torch.float32, seed=0, sparsity=0.5):
    """Magnitude-pruned parameters (exact zeros) and a random saliency for each."""
    g = torch.Generator().manual_seed(seed)
    params, sal = {}, {}
    for name, shape in SHAPES.items():
        w = torch.randn(shape, generator=g)
        n_pruned = int(sparsity * w.numel())
        if n_pruned:
            w[w.abs() <= w.abs().view(-1).kthvalue(n_pruned).values] = 0
        params[name] = nn.Parameter(w.to(dtype))
        sal[name] = torch.rand(shape, generator=g)
    return params, sal


def grads_for(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return {n: (torch.randn(p.shape, generator=g) * scale).to(p.dtype) for n, p in params.items()}


def selected_mask(plan, name):
    mask = torch.zeros(plan[name].param.numel(), dtype=torch.bool)
    mask[plan[name].selection.index.long()] = True
    return mask.view(plan[name].param.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_adamw_on_masked_amplified_grad(dtype, backend):
    params, sal = make_params(dtype)
    plan = plan_selection(params.items(), sal, alpha=ALPHA)
    # rounding="nearest": the master below is rounded to the param's dtype every step.
    opt = SAUAdamW(
        params.values(), plan=plan, lr=1e-2, weight_decay=0.0, backend=backend, rounding="nearest"
    )
    masters = {n: nn.Parameter(p.detach().float().clone()) for n, p in params.items()}
    ref = torch.optim.AdamW(masters.values(), lr=1e-2, weight_decay=0.0, foreach=False)
    masks = {n: selected_mask(plan, n) for n in params}
    tol = TOL[backend, dtype]
    for t in range(20):
        grads = grads_for(params, t)
        for n, p in params.items():
            p.grad = grads[n]
            w = plan[n].amplification
            masters[n].grad = grads[n].float() * masks[n] * w
        opt.step()
        ref.step()
        for n, p in params.items():
            with torch.no_grad():
                masters[n][p.detach() == 0] = 0  # re-zero pruned entries (a no-op here)
                # The kernel keeps params in their dtype: round the fp32 master the same way.
                masters[n].copy_(masters[n].to(dtype).float())
            atol, rtol = tol["param"]
            torch.testing.assert_close(p.detach(), masters[n].to(dtype), atol=atol, rtol=rtol)
            idx = plan[n].selection.index.long()
            st, rst = opt.state[p], ref.state[masters[n]]
            atol, rtol = tol["moment"]
            for key in ("exp_avg", "exp_avg_sq"):
                assert st[key].dtype == torch.float32
                torch.testing.assert_close(st[key], rst[key].view(-1)[idx], atol=atol, rtol=rtol)
            assert int(st["step"]) == t + 1
    assert any(plan[n].amplification > 1.5 for n in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_decay_leaves_pruned_and_unselected_bitwise_unchanged(dtype, backend):
    params, sal = make_params(dtype)
    before = {n: p.detach().clone() for n, p in params.items()}
    plan = plan_selection(params.items(), sal, alpha=ALPHA)
    opt = SAUAdamW(params.values(), plan=plan, lr=1e-2, weight_decay=0.5, backend=backend)
    for t in range(30):
        for n, g in grads_for(params, t).items():
            params[n].grad = g
        opt.step()
    moved = 0
    for n, p in params.items():
        frozen = ~selected_mask(plan, n)
        assert torch.equal(p.detach()[frozen], before[n][frozen])
        assert (p.detach()[before[n] == 0] == 0).all()
        moved += int((p.detach() != before[n]).sum())
    assert moved > 0


def test_amplify_update_scales_the_first_step_by_w():
    params, sal = make_params(seed=3)
    plan = plan_selection(params.items(), sal, alpha=ALPHA)
    p_plain = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    plan_plain = plan_selection(p_plain.items(), sal, alpha=0.0)  # same G, w = 1
    opt = SAUAdamW(params.values(), plan=plan, lr=0.1, amplify="update")
    plain = SAUAdamW(p_plain.values(), plan=plan_plain, lr=0.1)
    before = {n: p.detach().clone() for n, p in params.items()}
    for n, g in grads_for(params, 0).items():
        params[n].grad, p_plain[n].grad = g, g.clone()
    opt.step()
    plain.step()
    for n in params:
        w = plan[n].amplification
        assert w > 1 or n == "c"  # "c" has one entry: nothing pruned, w = 1
        delta = params[n].detach() - before[n]
        delta_plain = p_plain[n].detach() - before[n]
        # fp32 rounding of p + delta, |p| ~ 1 and |delta| ~ lr = 0.1: ~1e-6 relative.
        torch.testing.assert_close(delta, w * delta_plain, atol=1e-6, rtol=1e-5)


def test_amplify_is_per_param_group():
    """Two groups, amplify="grad" and "update": each steps as a one-group optimizer."""
    params, sal = make_params(seed=4)
    plan = plan_selection(params.items(), sal, alpha=ALPHA)
    names_a, names_b = ["a", "b"], ["c", "d"]
    twins = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    plan_twins = plan_selection(twins.items(), sal, alpha=ALPHA)
    groups = [
        {"params": [params[n] for n in names_a], "amplify": "grad"},
        {"params": [params[n] for n in names_b], "amplify": "update"},
    ]
    opt = SAUAdamW(groups, plan=plan, lr=0.05, eps=1e-3)  # eps large: "grad" shows too
    only_grad = SAUAdamW([twins[n] for n in names_a], plan=plan_twins, lr=0.05, eps=1e-3)
    only_update = SAUAdamW(
        [twins[n] for n in names_b], plan=plan_twins, lr=0.05, eps=1e-3, amplify="update"
    )
    for t in range(3):
        for n, g in grads_for(params, t).items():
            params[n].grad, twins[n].grad = g, g.clone()
        opt.step()
        only_grad.step()
        only_update.step()
    for n in params:
        assert torch.equal(params[n].detach(), twins[n].detach()), n
    # And the two modes really differ on the same layer.
    other = {n: nn.Parameter(p.detach().clone()) for n, p in make_params(seed=4)[0].items()}
    swapped = SAUAdamW(
        [other["a"]], plan=plan_selection(other.items(), sal, alpha=ALPHA), lr=0.05, eps=1e-3,
        amplify="update",
    )  # fmt: skip
    for t in range(3):
        other["a"].grad = grads_for(params, t)["a"]
        swapped.step()
    assert not torch.equal(other["a"].detach(), params["a"].detach())


def test_amplify_grad_acts_only_through_eps():
    """Adam is invariant to a gradient scale that is constant in time, up to eps."""

    def run(alpha, amplify, eps, grad_scale):
        params, sal = make_params(seed=5)
        plan = plan_selection(params.items(), sal, alpha=alpha)
        opt = SAUAdamW(params.values(), plan=plan, lr=1e-2, eps=eps, amplify=amplify)
        for t in range(10):
            for n, g in grads_for(params, t, scale=grad_scale).items():
                params[n].grad = g
            opt.step()
        return {n: p.detach() for n, p in params.items()}, plan

    base, plan = run(0.0, "grad", 0.0, 1.0)
    grad_mode, plan_w = run(ALPHA, "grad", 0.0, 1.0)
    update_mode, _ = run(ALPHA, "update", 0.0, 1.0)
    assert all(plan_w[n].amplification > 1.5 for n in base if n != "c")
    for n in base:
        # eps = 0: grad * w leaves m / sqrt(v) unchanged, so the result equals w = 1.
        torch.testing.assert_close(grad_mode[n], base[n], atol=1e-6, rtol=1e-6)
        moved = selected_mask(plan, n)
        if n != "c":
            assert not torch.allclose(update_mode[n][moved], base[n][moved], atol=1e-4)
    # With eps comparable to the gradients (here 1e-8 against grads ~1e-8), grad mode
    # does differ from w = 1: eps is the only channel through which it acts.
    small_base, _ = run(0.0, "grad", 1e-8, 1e-8)
    small_grad, _ = run(ALPHA, "grad", 1e-8, 1e-8)
    assert any(not torch.allclose(small_grad[n], small_base[n], atol=1e-6) for n in base)


def train_step(model, opt, t):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(4, 16, generator=g).to(next(model.parameters()).dtype)
    opt.zero_grad()
    model(x).float().pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_resume_in_lockstep(dtype):
    model = pruned_mlp(dtype)
    names = ["0.weight", "2.weight"]
    sal = {n: torch.rand(p.shape) for n, p in model.named_parameters() if n in names}
    plan = plan_selection(model.named_parameters(), sal, alpha=ALPHA)
    # Biases are outside the plan: dense AdamW, checkpointed alongside.
    opt = SAUAdamW(model.parameters(), plan=plan, lr=1e-2, weight_decay=0.1, amplify="update")
    for t in range(10):
        train_step(model, opt, t)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    twin = copy.deepcopy(model)
    twin_opt = SAUAdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, amplify="update")
    twin_opt.load_state_dict(loaded)  # no plan: index and w come from the state
    for p in twin.parameters():
        st = twin_opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        if "index" in st:
            assert st["index"].dtype == torch.int32
    for t in range(10, 20):
        train_step(model, opt, t)
        train_step(twin, twin_opt, t)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), name
            a, b = opt.state[p], twin_opt.state[q]
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, torch.Tensor):
                    assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
                else:
                    assert value == b[key]


def test_state_nbytes_at_half_sparsity():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    w[w.abs() <= w.abs().median()] = 0
    p = nn.Parameter(w)
    plan = plan_selection([("w", p)], {"w": torch.rand(256, 256)}, k=0.3)
    opt = SAUAdamW([p], plan=plan)
    assert opt.state_nbytes() == 0  # lazy
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    assert sorted(st) == ["amplification", "exp_avg", "exp_avg_sq", "index", "nonfinite", "step"]
    assert st["index"].dtype == torch.int32 and st["step"].dtype == torch.float32
    assert st["step"].dim() == 0 and isinstance(st["amplification"], float)
    assert opt.state_nbytes() <= 2 * p.numel()
    # 12 bytes per selected entry (two float32 moments, one int32 index) plus the step
    # (float32) and the non-finite counter (int64).
    assert opt.state_nbytes() == 12 * plan["w"].selection.n_selected + 4 + 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
        (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (dict(amplify="both"), "amplify must be one of"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAUAdamW([nn.Parameter(torch.zeros(3))], **kwargs)


def test_plan_from_another_model_is_refused():
    params, sal = make_params()
    plan = plan_selection(params.items(), sal)
    others = [nn.Parameter(p.detach().clone()) for p in params.values()]
    with pytest.raises(ValueError, match="by identity"):
        SAUAdamW(others, plan=plan)


def test_closure_returns_loss_and_runs_with_grad():
    p = nn.Parameter(torch.ones(3))
    opt = SAUAdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 3.0
    assert (p.detach() < 1).all()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_params_match_torch_adamw_with_param_groups(weight_decay):
    torch.manual_seed(0)
    shapes = [(7, 5), (11,), (3, 4)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]

    def groups(ps):
        return [
            {"params": ps[:2]},
            {"params": ps[2:], "lr": 3e-2, "weight_decay": 2 * weight_decay},
        ]

    opt = SAUAdamW(groups(ours), lr=1e-2, weight_decay=weight_decay)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, weight_decay=weight_decay, foreach=False)
    for t in range(20):
        g = torch.Generator().manual_seed(t)
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[a][key], ref.state[b][key], atol=0, rtol=1e-6)


def test_non_finite_gradient_entries_are_skipped_and_counted():
    params, sal = make_params()
    plan = plan_selection(params.items(), sal, alpha=ALPHA)
    dense = nn.Parameter(torch.randn(6))
    groups = [{"params": list(params.values())}, {"params": [dense]}]
    opt = SAUAdamW(groups, plan=plan, lr=1e-2)

    def fill():
        for n, g in grads_for(params, 0).items():
            params[n].grad = g
        dense.grad = torch.ones(6)

    fill()
    opt.step()
    assert opt.nonfinite_count() == 0
    before = {n: p.detach().clone() for n, p in params.items()}
    state_a = {k: opt.state[params["a"]][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    dense_before = dense.detach().clone()
    dense_m = opt.state[dense]["exp_avg"].clone()

    fill()
    sel = plan["a"].selection.index.long()
    params["a"].grad.view(-1)[sel[0]] = float("nan")  # the first selected entry of "a"
    dense.grad[0] = float("inf")
    opt.step()
    # The poisoned entries kept param and moments bitwise; everything else stepped.
    flat_a = params["a"].detach().view(-1)
    assert flat_a[sel[0]] == before["a"].view(-1)[sel[0]]
    assert opt.state[params["a"]]["exp_avg"][0] == state_a["exp_avg"][0]
    assert opt.state[params["a"]]["exp_avg_sq"][0] == state_a["exp_avg_sq"][0]
    assert not torch.equal(flat_a[sel[1:]], before["a"].view(-1)[sel[1:]])
    assert dense[0] == dense_before[0] and opt.state[dense]["exp_avg"][0] == dense_m[0]
    assert not torch.equal(dense.detach()[1:], dense_before[1:])
    for p in list(params.values()) + [dense]:
        assert torch.isfinite(p).all()
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.isfinite(opt.state[p][key]).all()
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        assert opt.nonfinite_count() == 2
    with warnings.catch_warnings():  # warned once only
        warnings.simplefilter("error")
        assert opt.nonfinite_count() == 2

    # A NaN at an unselected entry is never read by the update: nothing is counted.
    fill()
    unselected = (~selected_mask(plan, "a")).view(-1).nonzero()[0]
    params["a"].grad.view(-1)[unselected] = float("nan")
    opt.step()
    assert opt.nonfinite_count() == 2
    assert all(torch.isfinite(p).all() for p in params.values())


def test_deepcopy_steps_identically():
    params, sal = make_params(dtype=torch.bfloat16)
    plan = plan_selection(params.items(), sal, alpha=ALPHA)
    opt = SAUAdamW(params.values(), plan=plan, lr=1e-2, weight_decay=0.1)
    # Copied before the first step: the copy must still find its planned params lazily.
    params2, opt2 = copy.deepcopy((params, opt))
    for t in range(5):
        for n, g in grads_for(params, t).items():
            params[n].grad, params2[n].grad = g, g.clone()
        opt.step()
        opt2.step()
    for n in params:
        assert torch.equal(params[n], params2[n])
        assert torch.equal(opt.state[params[n]]["index"], opt2.state[params2[n]]["index"])
    assert opt2.state_nbytes() == opt.state_nbytes()
    opt3 = copy.deepcopy(opt)  # with state: moments stay float32
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt3.state.values())
