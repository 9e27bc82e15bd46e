"""sau.lab.variants: one registry for every command, and the plan and optimizer it builds."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from sau.cli import sweep as sweep_cmd
from sau.cli import unlearn as unlearn_cmd
from sau.lab import variants as V
from sau.lab.pipeline import PipelineConfig
from sau.lab.sweep.grid import expand
from sau.saliency import Saliency


def _choices(cmd, flag: str):
    sub = argparse.ArgumentParser().add_subparsers()
    parser = cmd.add_parser(sub)
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_command_reads_the_one_registry(monkeypatch):
    """A variant registered once is accepted by `sau unlearn`'s parser, the pipeline's
    config check and the sweep's grid, and named in `sau sweep --help`."""
    monkeypatch.setitem(V.VARIANTS, "half", V.Variant("pruned", "sau", k=0.5, alpha=0.0))
    assert "half" in _choices(unlearn_cmd, "--variant").choices
    assert "half" in _choices(sweep_cmd, "--variant").help
    PipelineConfig(variants=("half",)).validate()
    assert any(c.variant == "half" and c.k == 0.5 for c in expand([dict(variant=("half",))]))
    assert set(_choices(unlearn_cmd, "--variant").choices) == set(V.VARIANTS)


def _pruned_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    names = ["0.weight", "1.weight"]
    with torch.no_grad():
        for n in names:
            w = model.get_parameter(n)
            w[w.abs() < w.abs().median()] = 0
    named = {n: model.get_parameter(n) for n in names}
    forget = {n: torch.rand(p.shape) for n, p in named.items()}
    return named, Saliency(forget, {n: torch.rand(s.shape) for n, s in forget.items()}, 1.0)


@pytest.mark.parametrize("variant", ["sau-contrast", "sau-saliency-amp", "sau-global", "sau-mass"])
def test_option_variants_build_their_plan_and_optimizer(variant):
    named, sal = _pruned_pair()
    v = V.VARIANTS[variant]
    plan = V.plan_for(variant, named, sal, k=0.3, alpha=0.1, w_max=10.0)
    opt = V.build_optimizer(variant, list(named.values()), plan, lr=1e-3)
    assert opt.param_groups[0]["amplify"] == v.amplify
    assert plan.score == v.plan.get("score", "forget")
    assert plan.scope == v.plan.get("scope", "layer")
    assert plan.k == v.plan.get("k", 0.3)
    assert plan.alpha == 0.1


def test_run_settings_fill_what_a_variant_leaves_open():
    named, sal = _pruned_pair()
    plan = V.plan_for("sau", named, sal, k=0.5, alpha=0.2, w_max=10.0)
    assert (plan.k, plan.alpha) == (0.5, 0.2)
    opt = V.build_optimizer("sau", list(named.values()), plan, lr=1e-3, amplify="grad")
    assert opt.param_groups[0]["amplify"] == "grad"
    masked = V.plan_for("masked", named, sal, k=0.5, alpha=0.2, w_max=10.0)
    assert (masked.k, masked.alpha) == (1.0, 0.0)
    dense = V.build_optimizer("dense", list(named.values()), None, lr=1e-3)
    assert type(dense) is torch.optim.AdamW


def test_plans_with_the_same_settings_are_made_once_and_rebound():
    named, sal = _pruned_pair()
    cache: dict = {}
    first = V.plan_for("sau-grad", named, sal, k=0.3, alpha=0.1, w_max=10.0, cache=cache)
    copy = {n: nn.Parameter(p.detach().clone()) for n, p in named.items()}
    second = V.plan_for("sau-update", copy, sal, k=0.3, alpha=0.1, w_max=10.0, cache=cache)
    assert len(cache) == 1
    for name in named:
        assert first[name].param is named[name] and second[name].param is copy[name]
        assert torch.equal(first[name].selection.index, second[name].selection.index)


def test_register_variant_refuses_bad_definitions():
    with pytest.raises(TypeError):
        V.register_variant("x", object())
    with pytest.raises(ValueError, match="prune_after"):
        V.register_variant("x", V.Variant("pruned", "sau", prune_after=True))
    assert "x" not in V.VARIANTS


def test_build_optimizer_hands_the_precision_settings_to_sau_adamw():
    named, sal = _pruned_pair()
    plan = V.plan_for("sau-update", named, sal, k=0.3, alpha=0.1, w_max=10.0)
    opt = V.build_optimizer(
        "sau-update", list(named.values()), plan, lr=1e-3,
        rounding="stochastic", state_bits=8, seed=7,
    )  # fmt: skip
    group = opt.param_groups[0]
    assert (group["rounding"], group["state_bits"], group["seed"]) == ("stochastic", 8, 7)
    default = V.build_optimizer("sau-update", list(named.values()), plan, lr=1e-3)
    group = default.param_groups[0]
    assert (group["rounding"], group["state_bits"], group["seed"]) == ("kahan", 32, 0)
    # torch AdamW takes none of them (documented): the same optimizer either way
    dense = V.build_optimizer("dense", list(named.values()), None, lr=1e-3, state_bits=8)
    assert type(dense) is torch.optim.AdamW and "state_bits" not in dense.param_groups[0]
    with pytest.raises(ValueError, match="rounding"):
        V.build_optimizer("sau-update", list(named.values()), plan, lr=1e-3, rounding="up")


@pytest.mark.parametrize(
    ("variant", "dtype", "expect"),
    [
        ("sau-update", "bfloat16", ("bfloat16", "nearest", 8)),
        ("sau-update", "float32", ("float32", None, 8)),  # float32 weights: no rounding
        ("masked", "bfloat16", ("bfloat16", "nearest", 8)),
        ("dense", "bfloat16", ("bfloat16", None, None)),  # torch AdamW: neither setting
        ("unlearn-then-prune", "float32", ("float32", None, None)),
        (None, "bfloat16", ("bfloat16", None, None)),  # a starting model
    ],
)
def test_precision_settings_keep_what_the_optimizer_uses(variant, dtype, expect):
    got = V.precision_settings(variant, dtype, "nearest", 8)
    assert (got["dtype"], got["rounding"], got["state_bits"]) == expect


def test_sau_durable_is_sau_update_plus_the_push():
    v, base = V.VARIANTS["sau-durable"], V.VARIANTS["sau-update"]
    assert v.durable and not base.durable
    assert (v.start, v.optimizer, v.amplify, v.k, v.alpha) == (
        base.start,
        base.optimizer,
        base.amplify,
        base.k,
        base.alpha,
    )
