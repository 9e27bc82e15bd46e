"""Selection options of issue 15: contrast score, global scope, mass-based k, per-entry scales."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import sau_kernels as K
from sau import SAUAdamW, compute_saliency, plan_selection
from sau.saliency import Saliency, contrast_score
from sau_kernels import reference as R

BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def pruned(shape, seed, sparsity=0.5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    n_pruned = int(sparsity * w.numel())
    if n_pruned:
        w[w.abs() <= w.abs().view(-1).kthvalue(n_pruned).values] = 0
    return nn.Parameter(w)


def layers():
    return {
        "a": pruned((17, 33), 1),
        "b": pruned((63,), 2),
        "c": pruned((8, 8), 3, sparsity=0.0),
        "d": nn.Parameter(torch.zeros(4, 4)),  # all pruned
        "e": pruned((1,), 4, sparsity=0.0),  # single survivor
    }


def saliency_for(params, seed=10, scale_by_layer=True):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (n, p) in enumerate(params.items()):
        s = torch.rand(p.shape, generator=g) ** 2
        out[n] = s * 10.0**i if scale_by_layer else s
    return out


def with_retain(forget, seed=20, contrast=0.5):
    g = torch.Generator().manual_seed(seed)
    retain = {n: torch.rand(s.shape, generator=g) for n, s in forget.items()}
    return Saliency(forget, retain, contrast)


def test_contrast_score_formula_and_no_retain_information():
    f = torch.tensor([1.0, 2.0, 0.0, 4.0])
    r = torch.tensor([0.0, 1.0, 3.0, 4.0])  # mean 2
    got = contrast_score(f, r, 0.5)
    assert torch.equal(got, f / (r + 1.0))
    assert torch.equal(contrast_score(f, torch.zeros(4), 0.5), f)  # no retain information
    assert float(got[2]) == 0.0  # zero forget saliency stays zero (never selected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contrast_plan_selects_by_score_and_amplifies_by_forget(backend):
    params = layers()
    sal = with_retain(saliency_for(params))
    plan = plan_selection(params.items(), sal, k=0.3, alpha=0.7, score="contrast", backend=backend)
    assert plan.score == "contrast" and plan.to_dict()["score"] == "contrast"
    for name, p in params.items():
        score = contrast_score(sal[name], sal.retain[name], 0.5)
        want = R.select_topk(score, p.detach(), 0.3)
        sel = plan[name].selection
        assert torch.equal(sel.index, want.index) and torch.equal(sel.threshold, want.threshold)
        f = sal[name].double().view(-1)
        i_g = float(f[sel.index.long()].sum())
        i_p = float(f[p.detach().view(-1) == 0].sum())
        assert float(sel.importance_selected) == pytest.approx(i_g, rel=1e-12)
        assert float(sel.importance_pruned) == pytest.approx(i_p, rel=1e-12)
        expected_w = 1.0 if i_g == 0 else min(1 + 0.7 * i_p / i_g, 10.0)
        assert plan[name].amplification == pytest.approx(expected_w, rel=1e-12)
    # the contrast changes the choice: not the forget-only top-k on this data
    forget_only = plan_selection(params.items(), dict(sal), k=0.3)
    assert not torch.equal(plan["a"].selection.index, forget_only["a"].selection.index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_scope_is_one_sorted_threshold(backend):
    params = layers()
    sal = saliency_for(params)
    plan = plan_selection(params.items(), sal, k=0.3, scope="global", backend=backend)
    want = R.select_global(list(sal.values()), [p.detach() for p in params.values()], 0.3)
    for name, w in zip(params, want):
        assert torch.equal(plan[name].selection.index, w.index)
        assert torch.equal(plan[name].selection.threshold, w.threshold)
    # layers on a larger saliency scale take more of the budget than a per-layer k would
    # (per-layer k = 0.3 would select 20 of c's 64 survivors and 85 of a's 281)
    assert plan["c"].selection.n_selected > 20 and plan["a"].selection.n_selected < 85


@pytest.mark.parametrize("backend", BACKENDS)
def test_mass_k_per_layer(backend):
    params = layers()
    sal = saliency_for(params)
    plan = plan_selection(params.items(), sal, k="mass:0.8", backend=backend)
    assert plan.k == "mass:0.8"
    for name, p in params.items():
        want = R.select_mass(sal[name], p.detach(), 0.8)
        assert torch.equal(plan[name].selection.index, want.index)
        assert torch.equal(plan[name].selection.threshold, want.threshold)


def test_entry_scale_codes_are_saliency_over_mean_of_g():
    params = layers()
    sal = saliency_for(params)
    plan = plan_selection(params.items(), sal, k=0.3, w_max=4.0)
    for name in params:
        sel = plan[name].selection
        codes = plan[name].entry_scale
        assert codes.dtype == torch.uint8 and codes.numel() == sel.n_selected
        if sel.n_selected:
            s = sal[name].view(-1)[sel.index.long()]
            mean = float(s.double().mean())
            assert torch.equal(codes, K.encode_entry_scale(s, mean, 4.0))


def test_saliency_amplify_steps_like_the_kernel_with_its_codes():
    params = layers()
    sal = saliency_for(params)
    plan = plan_selection(params.items(), sal, k=0.5, w_max=10.0)
    opt = SAUAdamW(params.values(), plan=plan, lr=1e-2, amplify="saliency", weight_decay=0.1)
    expect = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(3)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)
    for name, p in params.items():
        lp = plan[name]
        n = lp.selection.n_selected
        m, v = torch.zeros(n), torch.zeros(n)
        R.masked_adamw_(
            expect[name],
            p.grad,
            m,
            v,
            lp.selection.index,
            step=1,
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            entry_scale=lp.entry_scale,
            entry_scale_max=10.0,
        )
    opt.step()
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), expect[name], atol=0, rtol=1e-6)
        st = opt.state[p]
        assert st["entry_scale"].dtype == torch.uint8 and st["entry_scale_max"] == 10.0


def test_saliency_amplify_state_bytes_and_checkpoint():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    w[w.abs() <= w.abs().median()] = 0
    p = nn.Parameter(w)
    plan = plan_selection([("w", p)], {"w": torch.rand(256, 256)}, k=0.3)
    opt = SAUAdamW([p], plan=plan, amplify="saliency")
    p.grad = torch.randn_like(p)
    opt.step()
    n_sel = plan["w"].selection.n_selected
    # 13 bytes per selected entry: two float32 moments, int32 index, uint8 scale code;
    # plus the step (float32) and the non-finite counter (int64).
    assert opt.state_nbytes() == 13 * n_sel + 4 + 8
    assert opt.state_nbytes() <= 2 * p.numel()  # DESIGN.md's 2 bytes/param still holds
    other = SAUAdamW([p], plan=plan, amplify="update")
    other.load_state_dict(opt.state_dict())
    st = other.state[p]
    assert st["entry_scale"].dtype == torch.uint8
    assert torch.equal(st["entry_scale"], opt.state[p]["entry_scale"])


@pytest.mark.parametrize("amplify", ["grad", "update", "saliency"])
def test_optimizer_keeps_entry_codes_only_for_saliency_groups(amplify):
    """The plan's per-entry codes stay alive through the optimizer only when it uses them:
    with the plan dropped they are freed in the other modes (1 B per entry of G)."""
    import gc
    import weakref

    p = pruned((64, 64), 5)
    plan = plan_selection([("w", p)], {"w": torch.rand(64, 64)}, k=0.3)
    codes = weakref.ref(plan["w"].entry_scale)
    opt = SAUAdamW([p], plan=plan, amplify=amplify)
    del plan
    gc.collect()
    assert (codes() is not None) == (amplify == "saliency")
    if amplify != "saliency":  # turned on afterwards: one clear error at the first step
        opt.param_groups[0]["amplify"] = "saliency"
        p.grad = torch.randn_like(p)
        with pytest.raises(ValueError, match="after SAUAdamW was built"):
            opt.step()


def test_bad_options():
    params = layers()
    sal = saliency_for(params)
    for kwargs, match in (
        (dict(score="ratio"), "score must be"),
        (dict(scope="model"), "scope must be"),
        (dict(k="mass:1.5"), "mass"),
        (dict(k="mass"), "mass"),
        (dict(k="top:0.3"), "mass"),
        (dict(k="mass:0.5", scope="global"), "cannot be combined"),
        (dict(score="contrast"), "retain"),
    ):
        with pytest.raises(ValueError, match=match):
            plan_selection(params.items(), sal, **kwargs)
    hand_made = {
        "a": type(plan_selection(params.items(), sal)["a"])(
            params["a"], K.select_topk(sal["a"], params["a"].detach(), 0.3), 1.0
        )
    }
    with pytest.raises(ValueError, match="per-entry scales"):
        SAUAdamW(params.values(), plan=hand_made, amplify="saliency")


def test_compute_saliency_with_retain_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    forget = [torch.randn(4, 6) for _ in range(2)]
    retain = [torch.randn(4, 6) for _ in range(3)]

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    sal = compute_saliency(model, forget, loss_fn, retain_batches=retain, contrast=0.25)
    alone_f = compute_saliency(model, forget, loss_fn)
    alone_r = compute_saliency(model, retain, loss_fn)
    assert isinstance(sal, Saliency) and sal.contrast == 0.25
    for name in alone_f:
        assert torch.equal(sal[name], alone_f[name])  # the forget pass is unchanged
        assert torch.equal(sal.retain[name], alone_r[name])
        assert torch.equal(sal.score(name), contrast_score(sal[name], sal.retain[name], 0.25))
    assert alone_f.retain is None
    with pytest.raises(ValueError, match="contrast"):
        compute_saliency(model, forget, loss_fn, retain_batches=retain, contrast=0.0)
