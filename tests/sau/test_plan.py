"""plan_selection: per-layer top-k selection, the amplification formula, the stats table."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sau import LayerPlan, SelectionPlan, plan_selection
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
    import copy

    from sau.plan import plan_selection

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
