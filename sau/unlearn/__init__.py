"""Unlearning: objectives (GA, GradDiff, NPO, SimNPO) and a resumable training loop."""

from __future__ import annotations

from sau.unlearn.loop import UnlearnConfig, UnlearnResult, stop_on_signals, unlearn
from sau.unlearn.objectives import (
    METHODS,
    ga_loss,
    graddiff_loss,
    nll,
    npo_loss,
    sequence_logprobs,
    simnpo_loss,
)

__all__ = [
    "METHODS",
    "UnlearnConfig",
    "UnlearnResult",
    "ga_loss",
    "graddiff_loss",
    "nll",
    "npo_loss",
    "sequence_logprobs",
    "simnpo_loss",
    "stop_on_signals",
    "unlearn",
]
