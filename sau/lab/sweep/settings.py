"""The run-wide settings of a sweep, and the metrics it keeps per evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sau.errors import SAUError
from sau.settings import INF, check

__all__ = ["METRICS", "NEUTRAL", "Settings"]

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
# Settings that change how a cell is computed but not its numbers (bitwise, as the
# pipeline tests check for `sau unlearn`): not part of a cell's identity, so a sweep run
# with and without them shares its finished cells.
NEUTRAL = ("compact_grads", "gradient_checkpointing")
_FLAGS = {"epochs": "--epochs", "max_epochs": "--max-epochs"}  # the command-line ones
_RANGES = {
    "epochs": (1, INF, False, False),
    "max_epochs": (1, INF, False, False),
    "batch_size": (1, INF, False, False),
    "retain_weight": (0.0, INF, False, False),
    "w_max": (1.0, INF, False, False),
    "eval_retain_rows": (1, INF, False, False),
    "eval_batch_size": (1, INF, False, False),
    "max_new_tokens": (1, INF, False, False),
    "group_size": (1, INF, False, False),
}


@dataclass(frozen=True)
class Settings:
    """Run-wide settings (the same for every cell; part of each result's fingerprint,
    except the NEUTRAL ones).

    epochs: passes over the forget set (stop_at="none"); max_epochs: the cap with
    stop_at="retain". bits: weight-only quantization widths evaluated per model (each
    2 to 16, RTN, or "nf4": NF4, block 64; metrics prefixed q{bits}_).
    compact_grads: SAUAdamW keeps grad[G] only (`sau unlearn --compact-grads`);
    gradient_checkpointing: activations recomputed in backward
    (`sau unlearn --gradient-checkpointing`); both bitwise neutral.
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
    compact_grads: bool = False
    gradient_checkpointing: bool = False

    def check(self) -> None:
        """Raise SAUError (one line) for a setting of the wrong type or out of range."""
        check(self, _RANGES, label=lambda name: _FLAGS.get(name, name))
        for b in self.bits:
            if b == "nf4":  # NF4, block 64 (sau.lab.quantize.nf4_quantize_dequantize)
                continue
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16:
                raise SAUError(f"--bits must be between 2 and 16 or nf4, got {b!r}")

    def to_dict(self) -> dict:
        """JSON-able dict of the settings."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def identity(self) -> dict:
        """The settings a cell's numbers depend on (`to_dict` without NEUTRAL)."""
        return {k: v for k, v in self.to_dict().items() if k not in NEUTRAL}
