"""The settings of one pipeline run, and the variants it can run.

Kept apart from sau.lab.pipeline so that commands and the sweep can name settings and
variants without importing the pipeline's machinery.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sau.errors import SAUError
from sau.names import LAYER_AMPLIFY_MODES, METHODS, PRUNE_CHOICES
from sau.settings import INF, check
from sau.unlearn.loop import UNLEARN_RANGES, UnlearnConfig

__all__ = ["OPTION_VARIANTS", "VARIANTS", "PipelineConfig", "load_config_file"]

VARIANTS = ("dense", "masked", "sau-grad", "sau-update", "unlearn-then-prune")
# Selection options of issue 15 (off by default; run them with variants=...): each is
# sau-update with one option changed, except sau-saliency-amp, which changes the amplify.
OPTION_VARIANTS = {
    "sau-contrast": ({"score": "contrast"}, "update"),  # F_f / (F_r + lambda mean F_r)
    "sau-saliency-amp": ({}, "saliency"),  # per-entry update scales s_i / mean_G s
    "sau-global": ({"scope": "global"}, "update"),  # one threshold over all layers
    "sau-mass": ({"k": "mass"}, "update"),  # per layer, the top holding `mass` of I_S
}


@dataclass
class PipelineConfig(UnlearnConfig):
    """Every knob of one pipeline run (a JSON config file may set any of these).

    The unlearning loop's settings (method, epochs, lr, batch_size, retain_batch_size,
    beta, simnpo_beta, gamma, retain_weight, kl_weight, seed, checkpoint_every,
    checkpoint_seconds, joint_forward) are UnlearnConfig's, inherited with its checks;
    only the learning rate's default differs (1e-3, sized for the embedded default on a
    2-core CPU). prune="none" takes the model as already pruned (its exact zeros are the
    pruned set).
    """

    lr: float = 1e-3
    prune: str = "magnitude"
    sparsity: float = 0.5
    nm: tuple | None = None  # (n, m), e.g. (2, 4): N:M pattern instead of `sparsity`
    k: float = 0.3
    alpha: float = 0.1
    w_max: float = 10.0
    amplify: str = "update"  # for the single "sau" variant of `sau unlearn`
    contrast: float = 1.0  # lambda of the sau-contrast score
    mass: float = 0.8  # share of survivor saliency that sau-mass selects per layer
    in_backward: bool = False  # SAUAdamW steps inside backward (masked / SAU variants)
    quick: bool = False
    variants: tuple = VARIANTS
    eval_retain_rows: int = 96
    eval_batch_size: int = 32
    max_new_tokens: int = 24

    def validate(self) -> None:
        """Raise SAUError (one line) for any setting of the wrong type or outside its range."""
        variants = VARIANTS + tuple(OPTION_VARIANTS) + ("sau",)
        rules = {**UNLEARN_RANGES, **_RANGES, "method": METHODS, "variants": variants}
        check(self, rules, label=lambda name: _FLAGS.get(name, name))
        if self.nm is not None:
            nm = tuple(self.nm)
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in nm)
            if len(nm) != 2 or not ints or not 0 < nm[0] <= nm[1]:
                raise SAUError(f"nm must be [n, m] with 0 < n <= m, e.g. [2, 4], got {self.nm}")

    def unlearn_config(self) -> UnlearnConfig:
        """The loop's part of this config, as the UnlearnConfig `sau.unlearn` takes."""
        return UnlearnConfig(**{f.name: getattr(self, f.name) for f in fields(UnlearnConfig)})


# Ranges (lo, hi, lo_open, hi_open) and allowed values of PipelineConfig's fields; types
# come from the annotations (sau.settings.check). NaN and inf are refused everywhere.
_RANGES = {
    "prune": PRUNE_CHOICES,
    "amplify": LAYER_AMPLIFY_MODES,
    "sparsity": (0.0, 1.0, False, True),
    "k": (0.0, 1.0, True, False),
    "alpha": (0.0, INF, False, False),
    "w_max": (1.0, INF, False, False),
    "eval_retain_rows": (1, INF, False, False),
    "eval_batch_size": (1, INF, False, False),
    "max_new_tokens": (1, INF, False, False),
    "contrast": (0.0, INF, True, False),
    "mass": (0.0, 1.0, True, False),
}
# Settings that are also command-line options are named as the user typed them.
_FLAGS = {n: f"--{n}" for n in ("method", "prune", "sparsity", "k", "alpha", "lr", "epochs")}
_FLAGS.update(seed="--seed", amplify="--amplify")


def load_config_file(path: str, base: PipelineConfig) -> PipelineConfig:
    """`base` with the keys of the JSON object in `path` applied; unknown keys are errors."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SAUError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SAUError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise SAUError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise SAUError(f"{path}: expected a JSON object of settings")
    known = {f.name: f for f in fields(PipelineConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SAUError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    if isinstance(data.get("variants"), list):
        data["variants"] = tuple(data["variants"])
    if isinstance(data.get("nm"), list):
        data["nm"] = tuple(data["nm"])
    return PipelineConfig(**{**asdict(base), **data})
