"""sau.names: each list of choices is the one every entry point offers and implements."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sau import names
from sau.cli.main import build_parser
from sau.lab.pipeline import PipelineConfig
from sau.optim import SAUAdamW
from sau.prune import prune_model, pruned_masks, target_linear_names
from sau.unlearn.loop import UnlearnConfig


def _choices(command: str, option: str):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    (action,) = [a for a in sub._actions if option in a.option_strings]
    return tuple(action.choices)


def test_command_line_offers_exactly_the_named_choices():
    assert _choices("demo", "--method") == names.METHODS
    assert _choices("unlearn", "--method") == names.METHODS
    assert _choices("demo", "--prune") == names.PRUNE_CHOICES
    assert _choices("prune", "--method") == names.PRUNE_METHODS
    assert _choices("unlearn", "--amplify") == names.LAYER_AMPLIFY_MODES


def test_every_named_method_is_implemented():
    for method in names.METHODS:
        UnlearnConfig(method=method).validate()
        PipelineConfig(method=method).validate()
    for prune in names.PRUNE_CHOICES:
        PipelineConfig(prune=prune).validate()
    for amplify in names.LAYER_AMPLIFY_MODES:
        PipelineConfig(amplify=amplify).validate()


@pytest.mark.parametrize("method", names.PRUNE_METHODS)
def test_every_named_pruning_method_prunes(method, make_tiny_lm):
    model, _ = make_tiny_lm()
    calib = [torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))]
    prune_model(model, method, 0.5, calib_batches=calib, progress=False)
    masks = pruned_masks(model, target_linear_names(model))
    assert all(m.float().mean() == 0.5 for m in masks.values())


def test_sauadamw_accepts_every_amplify_mode_and_backend():
    p = nn.Parameter(torch.zeros(3))
    for backend in (None, *names.BACKENDS):
        SAUAdamW([p], backend=backend)
    for amplify in names.LAYER_AMPLIFY_MODES:
        SAUAdamW([p], amplify=amplify)
    with pytest.raises(ValueError, match="amplify"):
        SAUAdamW([p], amplify="both")
