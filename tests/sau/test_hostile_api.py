"""The library API on bad input: compute_saliency, plan_selection and SAUAdamW refuse
it at the call with one clear error instead of ignoring it or failing later."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from sau import SAUAdamW, compute_saliency, plan_selection

BATCHES = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def loss(model, batch):
    return model(batch).pow(2).mean()


def test_contrast_without_retain_batches_is_refused():
    # Before: silently ignored (a forget-only saliency came back).
    with pytest.raises(ValueError, match="needs retain_batches"):
        compute_saliency(mlp(), BATCHES, loss, contrast=1.0, progress=False)
    with_retain = compute_saliency(mlp(), BATCHES, loss, retain_batches=BATCHES, progress=False)
    assert with_retain.contrast == 1.0  # the default lambda, with retain batches
    assert compute_saliency(mlp(), BATCHES, loss, progress=False).retain is None


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"retain_batches": BATCHES, "contrast": 0.0}, ValueError, "contrast"),
        ({"retain_batches": BATCHES, "contrast": float("nan")}, ValueError, "contrast"),
        ({"batches": []}, ValueError, "empty"),
        ({"loss_fn": lambda m, b: m(b)}, ValueError, "scalar"),
        ({"params": ["nope"]}, ValueError, "not found"),
        ({"dtype": torch.float16}, TypeError, "dtype"),
        ({"max_accumulator_bytes": 0}, ValueError, "max_accumulator_bytes"),
        ({"max_accumulator_bytes": True}, ValueError, "max_accumulator_bytes"),
        ({"batches": (b for b in BATCHES), "max_accumulator_bytes": 300}, TypeError, "iterator"),
    ],
)
def test_compute_saliency_refuses(kwargs, exc, match):
    args = {"batches": BATCHES, "loss_fn": loss, **kwargs}
    with pytest.raises(exc, match=match):
        compute_saliency(mlp(), args.pop("batches"), args.pop("loss_fn"), progress=False, **args)


def pruned_weight() -> nn.Parameter:
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    w[w.abs() <= w.abs().median()] = 0
    return nn.Parameter(w)


def scores(**change) -> dict:
    s = torch.rand(16, 32, generator=torch.Generator().manual_seed(4))
    for pos, value in change.items():
        s.view(-1)[int(pos[1:])] = value
    return {"w": s}


@pytest.mark.parametrize(
    ("kwargs", "sal", "match"),
    [
        ({"k": 0}, scores(), "k must be"),
        ({"k": True}, scores(), "k must be"),
        ({"k": "mass:2"}, scores(), "k must be"),
        ({"alpha": float("nan")}, scores(), "alpha"),
        ({"w_max": 0.5}, scores(), "w_max"),
        ({"score": "contrast"}, scores(), "retain Fisher"),
        ({}, scores(i5=float("nan")), "finite"),
        ({}, scores(i5=-1.0), ">= 0"),
        ({}, {"w": torch.rand(4, 4)}, "shape"),
        ({}, {**scores(), "x": torch.rand(2)}, "lacks"),
    ],
)
def test_plan_selection_refuses(kwargs, sal, match):
    with pytest.raises(ValueError, match=match):
        plan_selection([("w", pruned_weight())], sal, **kwargs)


def _with_index(plan, index):
    layer = plan["w"]
    return {
        "w": dataclasses.replace(layer, selection=dataclasses.replace(layer.selection, index=index))
    }


@pytest.mark.parametrize(
    ("edit", "exc", "match"),
    [
        (lambda i: i.flip(0), ValueError, "strictly increasing"),
        (lambda i: i + 10**6, IndexError, "out of range"),
        (lambda i: i.float(), TypeError, "int32 or int64"),
        (lambda i: torch.cat([i[:1], i]), ValueError, "more than once"),
    ],
)
def test_sauadamw_refuses_a_bad_plan_index_at_construction(edit, exc, match):
    w = pruned_weight()
    plan = plan_selection([("w", w)], scores(), k=0.3)
    with pytest.raises(exc, match=match):
        SAUAdamW([w], plan=_with_index(plan, edit(plan["w"].selection.index)))
