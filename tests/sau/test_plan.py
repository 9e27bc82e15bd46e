"""plan_selection: per-layer top-k selection, the amplification formula, the stats table;
the selection options (contrast score, global scope, mass-based k) and the per-entry
scales that SAUAdamW(amplify="saliency") steps with."""

from __future__ import annotations

import copy
import gc
import json
import math
import weakref

import pytest
import torch
from torch import nn

import sau_kernels as K
from sau import LayerPlan, SAUAdamW, SelectionPlan, compute_saliency, plan_selection
from sau.saliency import Saliency, contrast_score
from sau_kernels import reference


def pruned(shape, sparsity=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    n_pruned = int(sparsity * w.numel())
    if n_pruned:
        cut = w.abs().view(-1).kthvalue(n_pruned).values
        w[w.abs() <= cut] = 0
    return nn.Parameter(w)


def layers():
    return {
        "a.weight": pruned((17, 33), seed=1),  # non-power-of-two 2-D
        "b.weight": pruned((63,), seed=2),
        "c.weight": pruned((8, 8), sparsity=0.0, seed=3),  # nothing pruned
        "d.weight": nn.Parameter(torch.zeros(4, 4)),  # all pruned
        "e.weight": pruned((1,), sparsity=0.0, seed=4),
    }


def saliency_for(params, seed=10):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in params.items()}


def scaled_saliency(params, seed=10):
    """Squared uniform saliency, layer i on the scale 10**i (so a global threshold
    favours the later layers)."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g) ** 2 * 10.0**i
        for i, (n, p) in enumerate(params.items())
    }


def test_selection_and_amplification(backend):
    params = layers()
    sal = saliency_for(params)
    alpha, w_max, k = 0.7, 10.0, 0.3
    plan = plan_selection(params.items(), sal, k=k, alpha=alpha, w_max=w_max, backend=backend)
    assert isinstance(plan, SelectionPlan) and list(plan) == list(params)
    for name, p in params.items():
        lp = plan[name]
        assert isinstance(lp, LayerPlan) and lp.param is p
        ref = reference.select_topk(sal[name], p.detach(), k)
        assert torch.equal(lp.selection.index, ref.index)
        assert lp.selection.index.dtype == torch.int32
        i_p = float(sal[name].double()[p.detach() == 0].sum())
        i_g = float(sal[name].double().view(-1)[ref.index.long()].sum())
        expected = 1.0 if i_g == 0 else min(1 + alpha * i_p / i_g, w_max)
        assert lp.amplification == pytest.approx(expected, rel=1e-12)
    assert plan["a.weight"].amplification > 1  # half pruned: something to redistribute
    assert plan["c.weight"].amplification == 1.0  # nothing pruned: I_P = 0
    assert plan["d.weight"].selection.n_selected == 0
    assert plan["d.weight"].amplification == 1.0  # no survivors: I_G = 0


def test_w_max_clamp_and_zero_saliency():
    p = pruned((10, 10), sparsity=0.9)
    sal = torch.ones(10, 10)
    sal[p.detach() == 0] = 1000.0  # the pruned entries carry almost all importance
    plan = plan_selection([("w", p)], {"w": sal}, alpha=1.0, w_max=3.0)
    assert plan["w"].amplification == 3.0
    unclamped = plan_selection([("w", p)], {"w": sal}, alpha=1.0, w_max=1e9)
    # I_P = 90 * 1000; the 10 survivors all tie at tau = 1, so all are in G: I_G = 10.
    assert unclamped["w"].selection.n_selected == 10
    assert unclamped["w"].amplification == pytest.approx(1 + 90_000 / 10)
    zero = plan_selection([("w", p)], {"w": torch.zeros(10, 10)}, alpha=1.0)
    assert zero["w"].amplification == 1.0  # I_G == 0
    assert zero["w"].selection.n_selected == 0  # zero saliency is never selected
    assert math.isinf(zero["w"].stats("w")["tau"])
    no_alpha = plan_selection([("w", p)], {"w": sal}, alpha=0.0)
    assert no_alpha["w"].amplification == 1.0


def test_only_names_in_saliency_are_planned():
    params = layers()
    sal = {"a.weight": saliency_for(params)["a.weight"]}
    plan = plan_selection(params.items(), sal)
    assert list(plan) == ["a.weight"] and len(plan) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0.0), r"k must be a fraction in \(0, 1\]"),
        (dict(k=1.5), r"k must be a fraction in \(0, 1\]"),
        (dict(k=float("nan")), r"k must be"),
        (dict(alpha=-0.1), "alpha must be a finite number >= 0"),
        (dict(w_max=0.5), "w_max must be a finite number >= 1"),
        (dict(w_max=float("inf")), "w_max must be"),
    ],
)
def test_settings_validation(kwargs, match):
    params = layers()
    with pytest.raises(ValueError, match=match):
        plan_selection(params.items(), saliency_for(params), **kwargs)


def test_shape_and_name_mismatch():
    params = layers()
    sal = saliency_for(params)
    sal["a.weight"] = sal["a.weight"].reshape(-1)
    with pytest.raises(ValueError, match=r"saliency\['a.weight'\] has shape \(561,\)"):
        plan_selection(params.items(), sal)
    sal = saliency_for(params)
    sal["zzz.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="named_params lacks"):
        plan_selection(params.items(), sal)


class LazySaliency(dict):
    """A Mapping that builds each layer's bfloat16 scores on access, and records how many
    earlier layers' tensors (and their float32 copies) were still alive at each access."""

    def __init__(self, params, seed=10):
        super().__init__(saliency_for(params, seed))
        self.alive: set[int] = set()
        self.alive_at_access: list[int] = []

    def __getitem__(self, name):
        self.alive_at_access.append(len(self.alive))
        fresh = super().__getitem__(name).to(torch.bfloat16)
        key = len(self.alive_at_access)
        self.alive.add(key)
        weakref.finalize(fresh, self.alive.discard, key)
        return fresh


@pytest.mark.parametrize("k", [0.3, "mass:0.5"], ids=["per-layer", "options"])
def test_plan_reads_a_lazy_saliency_one_layer_at_a_time(k):
    # Per-layer top-k fetches each layer once and frees it (and its float32 copy) before
    # the next: a saliency kept on the host or on disk costs one layer on the device.
    params = layers()
    lazy = LazySaliency(params)
    plain = {n: t.to(torch.bfloat16) for n, t in saliency_for(params).items()}
    got, want = (
        plan_selection(params.items(), lazy, k=k),
        plan_selection(params.items(), plain, k=k),
    )
    for name in params:
        assert torch.equal(got[name].selection.index, want[name].selection.index), name
        assert torch.equal(got[name].entry_scale, want[name].entry_scale), name
    assert len(lazy.alive_at_access) == len(params)  # each layer read once
    if k == 0.3:
        assert lazy.alive_at_access == [0] * len(params)
    gc.collect()
    assert not lazy.alive


def test_stats_table_text_and_json():
    params = layers()
    plan = plan_selection(params.items(), saliency_for(params), alpha=0.5)
    rows = plan.stats()
    assert [r["name"] for r in rows] == list(params)
    keys = ["name", "numel", "sparsity", "n_selected", "tau", "I_P", "I_S", "I_G", "w"]
    assert all(list(r) == keys for r in rows)
    a = rows[0]
    assert a["numel"] == 17 * 33
    assert a["sparsity"] == pytest.approx((params["a.weight"] == 0).float().mean().item())
    assert a["n_selected"] == plan["a.weight"].selection.n_selected
    assert math.isinf(rows[3]["tau"])  # all-pruned layer selects nothing

    text = plan.to_text()
    lines = text.splitlines()
    # header, rule, one line per layer, rule, totals
    assert len(lines) == len(params) + 4
    assert lines[0].split()[0] == "layer" and lines[-1].startswith("total")
    for name, line in zip(params, lines[2:-2]):
        assert line.startswith(name)
    assert len({len(line) for line in lines[:2]}) == 1  # header as wide as the rule

    data = json.loads(plan.to_json())
    assert data["k"] == 0.3 and data["alpha"] == 0.5 and data["w_max"] == 10.0
    assert len(data["layers"]) == len(params)
    assert data["layers"][3]["tau"] is None  # JSON has no Infinity
    assert data["totals"]["numel"] == sum(p.numel() for p in params.values())
    assert data["totals"]["n_selected"] == sum(r["n_selected"] for r in rows)
    assert plan.to_dict() == data


def test_bound_to_rebinds_params_and_keeps_the_selection():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        a.weight[a.weight.abs() < 0.1] = 0
    sal = {"w": torch.rand(6, 8)}
    plan = plan_selection([("w", a.weight)], sal, k=0.5, alpha=0.1)
    b = copy.deepcopy(a)
    bound = plan.bound_to({"w": b.weight})
    assert bound["w"].param is b.weight and plan["w"].param is a.weight
    assert bound["w"].selection is plan["w"].selection
    assert bound.stats() == plan.stats() and (bound.k, bound.alpha) == (plan.k, plan.alpha)
    with pytest.raises(ValueError, match="shape"):
        plan.bound_to({"w": torch.nn.Parameter(torch.zeros(8, 6))})


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


def test_contrast_plan_selects_by_score_and_amplifies_by_forget(backend):
    params = layers()
    sal = with_retain(scaled_saliency(params))
    plan = plan_selection(params.items(), sal, k=0.3, alpha=0.7, score="contrast", backend=backend)
    assert plan.score == "contrast" and plan.to_dict()["score"] == "contrast"
    for name, p in params.items():
        score = contrast_score(sal[name], sal.retain[name], 0.5)
        want = reference.select_topk(score, p.detach(), 0.3)
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
    assert not torch.equal(
        plan["a.weight"].selection.index, forget_only["a.weight"].selection.index
    )


def test_global_scope_is_one_sorted_threshold(backend):
    params = layers()
    sal = scaled_saliency(params)
    plan = plan_selection(params.items(), sal, k=0.3, scope="global", backend=backend)
    want = reference.select_global(list(sal.values()), [p.detach() for p in params.values()], 0.3)
    for name, w in zip(params, want):
        assert torch.equal(plan[name].selection.index, w.index)
        assert torch.equal(plan[name].selection.threshold, w.threshold)
    # layers on a larger saliency scale take more of the budget than a per-layer k would
    # (per-layer k = 0.3 would select 20 of c's 64 survivors and 85 of a's 281)
    assert plan["c.weight"].selection.n_selected > 20 and plan["a.weight"].selection.n_selected < 85


def test_mass_k_per_layer(backend):
    params = layers()
    sal = scaled_saliency(params)
    plan = plan_selection(params.items(), sal, k="mass:0.8", backend=backend)
    assert plan.k == "mass:0.8"
    for name, p in params.items():
        want = reference.select_mass(sal[name], p.detach(), 0.8)
        assert torch.equal(plan[name].selection.index, want.index)
        assert torch.equal(plan[name].selection.threshold, want.threshold)


def test_entry_scale_codes_are_saliency_over_mean_of_g():
    params = layers()
    sal = scaled_saliency(params)
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
    sal = scaled_saliency(params)
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
        reference.masked_adamw_(
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
    assert opt.state_nbytes() <= 2 * p.numel()  # at most 2 bytes per parameter
    other = SAUAdamW([p], plan=plan, amplify="update")
    other.load_state_dict(opt.state_dict())
    st = other.state[p]
    assert st["entry_scale"].dtype == torch.uint8
    assert torch.equal(st["entry_scale"], opt.state[p]["entry_scale"])


@pytest.mark.parametrize("amplify", ["grad", "update", "saliency"])
def test_optimizer_keeps_entry_codes_only_for_saliency_groups(amplify):
    """The plan's per-entry codes stay alive through the optimizer only when it uses them:
    with the plan dropped they are freed in the other modes (1 B per entry of G)."""
    p = pruned((64, 64), seed=5)
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
    sal = scaled_saliency(params)
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
    a = params["a.weight"]
    hand_made = {"a.weight": LayerPlan(a, K.select_topk(sal["a.weight"], a.detach(), 0.3), 1.0)}
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


@pytest.mark.parametrize("w_max", [1.5, 4.0, 10.0])
def test_entry_scale_codes_equal_the_formula_bit_for_bit(w_max):
    # encode_entry_scale works in place on one float64 copy; its codes must be those of
    # round(clamp(log(s / mean) / log(w_max), -1, 1) * 127) + 127 computed step by step.
    g = torch.Generator().manual_seed(3)
    s = torch.rand(100_003, generator=g) ** 3
    s[::17] = 0.0
    mean = float(s.double().mean())
    ratio = torch.log(s.double() / mean) / math.log(w_max)
    want = (torch.round(ratio.clamp(-1.0, 1.0) * 127) + 127).to(torch.uint8)
    assert torch.equal(K.encode_entry_scale(s, mean, w_max), want)
