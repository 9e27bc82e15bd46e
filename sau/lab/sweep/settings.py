"""The run-wide settings of a sweep, and the metrics it keeps per evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["METRICS", "Settings"]

# Metrics kept per evaluation (and per quantized evaluation, with a q8_/q4_ prefix).
METRICS = (
    "forget_quality",
    "model_utility",
    "forget_rouge",
    "retain_rouge",
    "mia_auc",
    "forget_truth_ratio_score",
    "forget_prob",
)


@dataclass(frozen=True)
class Settings:
    """Run-wide settings (the same for every cell; part of each result's fingerprint).

    epochs: passes over the forget set (stop_at="none"); max_epochs: the cap with
    stop_at="retain". bits: weight-only quantization widths evaluated per model.
    """

    epochs: int = 5
    max_epochs: int = 10
    batch_size: int = 16
    retain_weight: float = 1.0
    w_max: float = 10.0
    eval_retain_rows: int = 96
    eval_batch_size: int = 32
    max_new_tokens: int = 24
    bits: tuple = (8, 4)
    group_size: int = 128

    def to_dict(self) -> dict:
        """JSON-able dict of the settings."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
