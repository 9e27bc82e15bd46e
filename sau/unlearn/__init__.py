"""Unlearning: objectives (GA, GradDiff, NPO, SimNPO) and a resumable training loop."""

from __future__ import annotations

from sau.names import METHODS
from sau.unlearn.loop import UnlearnConfig, UnlearnResult, unlearn
from sau.unlearn.objectives import (
    ga_loss,
    graddiff_loss,
    nll,
    npo_loss,
    objective_loss,
    sequence_logprobs,
    simnpo_loss,
)
from sau.unlearn.signals import stop_on_signals

__all__ = [
    "METHODS",
    "UnlearnConfig",
    "UnlearnResult",
    "ga_loss",
    "graddiff_loss",
    "nll",
    "npo_loss",
    "objective_loss",
    "sequence_logprobs",
    "simnpo_loss",
    "stop_on_signals",
    "unlearn",
]
