"""The sweep's grid: cells, axes, presets and their expansion over the variant registry.

A grid is a list of blocks; each block maps axis names to value lists and contributes
the Cartesian product of them. Cells are normalized (an axis a variant ignores gets one
canonical value), so cells that would compute the same thing are one cell: `dense` does
not depend on the sparsity, `masked` not on k or alpha, torch AdamW not on rounding or
state_bits, float32 weights not on rounding (`sau.lab.variants.precision_settings`).
Every cell also brings its dependencies: the reference rows (retain model, dense target,
pruned target at its sparsity, all in the cell's dtype) and, for unlearn-then-prune, the
dense cell whose model it prunes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace

from sau.errors import SAUError
from sau.lab.variants import ALIASES, DEFAULT_VARIANTS, DTYPES, VARIANTS, precision_settings
from sau.names import METHODS, ROUNDINGS, STATE_BITS
from sau.unlearn.loop import UNLEARN_RANGES

__all__ = [
    "AXES",
    "PRESETS",
    "PRESET_SETTINGS",
    "PRESET_SOURCE",
    "REFERENCES",
    "Cell",
    "alias_of",
    "expand",
    "number_label",
    "parse_prune",
]


REFERENCES = ("retain", "target")  # starting models: evaluated, never unlearned
STOP_AT = ("none", "retain")
AXES = (
    "sparsity",
    "prune",
    "variant",
    "lr",
    "k",
    "alpha",
    "method",
    "seed",
    "stop_at",
    "dtype",
    "rounding",
    "state_bits",
)
DEFAULTS = dict(
    sparsity=(0.5,),
    prune=("magnitude",),
    variant=DEFAULT_VARIANTS,
    lr=(1e-3,),
    k=(0.3,),
    alpha=(0.1,),
    method=("graddiff",),
    seed=(0,),
    stop_at=("none",),
    dtype=(DTYPES[0],),
    rounding=(ROUNDINGS[0],),
    state_bits=(STATE_BITS[0],),
)
# Key labels of the dtypes that are not the default (the default's keys name none).
_DTYPE_LABELS = {"bfloat16": "bf16"}

# fmt: off
_PAPER_SPARSITY = (0.0, 0.3, 0.5, 0.7, 0.9)
_LRS = (1e-3, 2e-3, 3e-3)
PRESETS: dict[str, list[dict]] = {
    # Small enough for a CI smoke test, yet every plot and table gets data.
    "quick": [
        dict(sparsity=(0.3, 0.6), variant=("masked", "sau-update"), lr=(1e-3, 3e-3)),
        dict(sparsity=(0.6,), variant=("unlearn-then-prune",), lr=(3e-3,)),
        dict(sparsity=(0.6,), variant=("sau-update",), lr=(3e-3,), k=(0.3, 0.6),
             alpha=(0.0, 0.1)),
        dict(sparsity=(0.6,), variant=("masked", "sau-update"), lr=(3e-3,), stop_at=("retain",)),
    ],
    # The paper's experiments plus the open questions.
    "paper": [
        # degradation curve and Pareto fronts over the learning rate
        dict(sparsity=_PAPER_SPARSITY, lr=_LRS,
             variant=("dense", "masked", "sau-grad", "sau-update", "unlearn-then-prune")),
        # component ablation
        dict(sparsity=(0.5, 0.7), lr=_LRS,
             variant=("masked", "mask-only", "redistribute-only", "sau-update")),
        # k x alpha sensitivity
        dict(sparsity=(0.5,), lr=(1e-3, 3e-3), variant=("sau-update",),
             k=(0.1, 0.3, 0.5), alpha=(0.05, 0.1, 0.2)),
        # matched forgetting: stop at the retain model's forget ROUGE-L
        dict(sparsity=(0.5, 0.7), lr=(3e-3,), stop_at=("retain",),
             variant=("dense", "masked", "sau-update", "unlearn-then-prune")),
        # N:M
        dict(prune=("2:4",), lr=_LRS, variant=("masked", "sau-update")),
        # selection options at matched forgetting
        dict(prune=("magnitude", "wanda"), lr=(3e-3,), stop_at=("retain",),
             variant=("masked", "sau-update", "sau-contrast", "sau-saliency-amp",
                      "sau-global", "sau-mass")),
    ],
}
# fmt: on
# Per preset: the embedded corpus it runs on and its run-wide settings (sau.lab.sweep.Settings).
PRESET_SOURCE = {"quick": "quick", "paper": "default"}
PRESET_SETTINGS = {
    "quick": dict(epochs=2, max_epochs=4, batch_size=8, eval_retain_rows=16, max_new_tokens=12),
    "paper": {},
}


def number_label(value) -> str:
    """A number as keys, labels and tables show it: the short form (`{:g}`: 0.001, 0.5, 0)
    when it reads back as exactly `value`, else `repr` (1.0000001e-03 stays distinct from
    0.001). Two different numbers never get the same label."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def parse_prune(value: str) -> tuple[str, tuple[int, int] | None]:
    """'magnitude' | 'wanda' | 'none' | 'N:M' (magnitude N:M) | 'wanda-N:M' -> (method, nm)."""
    method, _, pattern = value.rpartition("-") if "-" in value else ("", "", value)
    if ":" in pattern:
        try:
            n, m = (int(v) for v in pattern.split(":"))
        except ValueError:
            raise SAUError(f"--prune {value!r}: N:M must be two integers, e.g. 2:4") from None
        if not 0 < n <= m:
            raise SAUError(f"--prune {value!r}: N:M needs 0 < N <= M")
        method = method or "magnitude"
        if method not in ("magnitude", "wanda"):
            raise SAUError(f"--prune {value!r}: unknown pruning method {method!r}")
        return method, (n, m)
    if value not in ("magnitude", "wanda", "none"):
        raise SAUError(f"--prune must be magnitude, wanda, none or N:M (e.g. 2:4), got {value!r}")
    return value, None


@dataclass(frozen=True, order=True)
class Cell:
    """One point of the grid (after normalization). Reference cells have variant
    "retain" or "target"; lr, k, alpha are None where the variant ignores them, rounding
    and state_bits where its optimizer ignores them (`precision_settings`)."""

    seed: int
    variant: str
    prune: str = "none"
    sparsity: float = 0.0
    method: str | None = None
    lr: float | None = None
    k: float | None = None
    alpha: float | None = None
    stop_at: str = "none"
    dtype: str = "float32"
    rounding: str | None = None
    state_bits: int | None = None

    @property
    def is_reference(self) -> bool:
        """True for the starting-model rows (retain model, target)."""
        return self.variant in REFERENCES

    def key(self) -> str:
        """A readable, unique, file-name-safe name of the cell (numbers by
        `number_label`: two cells that differ in any setting never share a key)."""
        parts = [self.variant, f"seed{self.seed}"]
        if self.variant != "retain":
            parts.append(f"{self.prune.replace(':', 'of')}{number_label(self.sparsity)}")
        for label, value in (("", self.method), ("lr", self.lr), ("k", self.k), ("a", self.alpha)):
            if value is not None:
                parts.append(f"{label}{number_label(value)}")
        if self.stop_at != "none":
            parts.append(f"stop-{self.stop_at}")
        # Only settings other than the defaults: a float32 cell keeps the key it always had.
        if self.dtype != DTYPES[0]:
            parts.append(_DTYPE_LABELS.get(self.dtype, self.dtype))
        if self.rounding not in (None, ROUNDINGS[0]):
            parts.append(self.rounding)
        if self.state_bits not in (None, STATE_BITS[0]):
            parts.append(f"state{self.state_bits}")
        return "_".join(parts)

    def to_dict(self) -> dict:
        """The cell's settings as a JSON-able dict."""
        return asdict(self)


def _normalize(cell: Cell) -> Cell:
    """Give every axis the variant ignores one canonical value (see module docstring)."""
    if cell.variant == "retain":
        return Cell(seed=cell.seed, variant="retain", dtype=cell.dtype)
    _, nm = parse_prune(cell.prune)
    if nm is not None:
        cell = replace(cell, sparsity=1.0 - nm[0] / nm[1])
    if cell.sparsity == 0.0:
        cell = replace(cell, prune="none")
    if cell.variant == "target":
        return Cell(
            seed=cell.seed,
            variant="target",
            prune=cell.prune,
            sparsity=cell.sparsity,
            dtype=cell.dtype,
        )
    v = VARIANTS[cell.variant]
    if v.start == "dense" and not v.prune_after:
        cell = replace(cell, prune="none", sparsity=0.0)
    use_k, use_alpha = v.uses_plan_axes
    k = cell.k if use_k else v.k if v.optimizer == "sau" else None
    alpha = cell.alpha if use_alpha else v.alpha if v.optimizer == "sau" else None
    precision = precision_settings(cell.variant, cell.dtype, cell.rounding, cell.state_bits)
    return replace(cell, k=k, alpha=alpha, **precision)


def alias_of(cell: Cell) -> Cell | None:
    """The dense cell whose computation `cell` repeats exactly, or None.

    At sparsity 0 nothing is pruned: a `dense_when_unpruned` variant (`masked`: AdamW on
    every survivor, and every weight survives) is dense unlearning, and unlearn-then-prune
    prunes nothing after it. Such a cell's row is the dense cell's numbers under its own
    name (sau.lab.sweep.run.CellRunner), so a sweep never runs the same unlearning twice.
    Only with float32 weights and moments, though: SAUAdamW's bfloat16 rounding and 8-bit
    moments are not torch AdamW's.
    """
    if cell.is_reference or cell.sparsity != 0.0:
        return None
    v = VARIANTS[cell.variant]
    same_step = cell.dtype == DTYPES[0] and cell.state_bits in (None, STATE_BITS[0])
    if not ((v.dense_when_unpruned and same_step) or v.prune_after):
        return None
    return dense_of(cell)


def dense_of(cell: Cell) -> Cell:
    """The dense unlearning cell with `cell`'s seed, method, lr and stopping rule: the run
    an unlearn-then-prune cell prunes, and the one an alias (`alias_of`) repeats."""
    return _normalize(replace(cell, variant="dense"))


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_WORD_AXES = ("variant", "prune", "method", "stop_at", "dtype", "rounding")


def _check_value(axis: str, value) -> None:
    """One clear line for an axis value no cell can use."""

    def real(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    bad = None
    lo_seed, hi_seed = UNLEARN_RANGES["seed"][:2]  # what torch.manual_seed and the loop take
    if axis in _WORD_AXES and not isinstance(value, str):
        bad = "a string"
    elif axis == "variant" and value not in VARIANTS and value not in ALIASES:
        bad = f"one of {', '.join(sorted(VARIANTS))}"
    elif axis == "sparsity" and not (real(value) and 0.0 <= value < 1.0):
        bad = "a number in [0, 1)"
    elif axis == "lr" and not (real(value) and value > 0):
        bad = "a number > 0"
    elif axis == "k" and not (real(value) and 0.0 < value <= 1.0):
        bad = "a number in (0, 1]"
    elif axis == "alpha" and not (real(value) and value >= 0):
        bad = "a number >= 0"
    elif axis == "method" and value not in METHODS:
        bad = f"one of {', '.join(METHODS)}"
    elif axis == "seed" and not (_integer(value) and lo_seed <= value <= hi_seed):
        bad = f"an integer >= {lo_seed} and <= {hi_seed}"  # also SAUAdamW's rounding seed
    elif axis == "dtype" and value not in DTYPES:
        bad = f"one of {', '.join(DTYPES)}"
    elif axis == "rounding" and value not in ROUNDINGS:
        bad = f"one of {', '.join(ROUNDINGS)}"
    elif axis == "state_bits" and not (_integer(value) and value in STATE_BITS):
        bad = f"one of {', '.join(map(str, STATE_BITS))}"
    elif axis == "stop_at" and value not in STOP_AT:
        bad = f"one of {', '.join(STOP_AT)}"
    elif axis == "prune":
        parse_prune(value)
    if bad:
        raise SAUError(f"--{axis.replace('_', '-')} {value!r}: expected {bad}")


def _block_axes(block, overrides: dict) -> dict:
    """{axis: tuple of checked values} of one grid block, `overrides` applied."""
    if not isinstance(block, dict):
        raise SAUError(f"a grid block must be a dict of axis -> values, got {block!r}")
    unknown = set(block) - set(AXES)
    if unknown:
        raise SAUError(f"unknown grid axis {sorted(unknown)[0]!r}; axes: {', '.join(AXES)}")
    axes = {a: overrides.get(a, block.get(a, DEFAULTS[a])) for a in AXES}
    for axis, values in axes.items():
        if not isinstance(values, (list, tuple)):
            raise SAUError(f"grid axis {axis!r}: expected a list of values, got {values!r}")
        for value in values:
            _check_value(axis, value)
    return {a: tuple(v) for a, v in axes.items()}


def expand(blocks: list[dict], overrides: dict | None = None, *, retain: bool = True) -> list[Cell]:
    """All cells of `blocks` (each: axis -> values), dependencies included, sorted so
    that cells sharing a loaded model, a pruned model or a dense run are adjacent.

    Args:
        blocks: list of dicts axis -> sequence of values; missing axes take DEFAULTS.
        overrides: axis -> values replacing that axis in every block (command line).
        retain: there is a retain model (a "retain" reference row per seed and dtype);
            without one, forget quality is not measured and --stop-at retain is refused.

    Raises:
        SAUError: an unknown axis or axis value, a grid without cells, or --stop-at retain
            without a retain model.
    """
    overrides = {a: v for a, v in (overrides or {}).items() if v is not None}
    cells: set[Cell] = set()
    if not isinstance(blocks, (list, tuple)):
        raise SAUError(f"a grid must be a list of blocks, got {blocks!r}")
    for block in blocks:
        axes = _block_axes(block, overrides)
        for combo in itertools.product(*(axes[a] for a in AXES)):
            # -0.0 + 0.0 is 0.0: a signed zero is the same cell, with the same key
            raw = {a: v + 0.0 if isinstance(v, float) else v for a, v in zip(AXES, combo)}
            raw["variant"] = ALIASES.get(raw["variant"], raw["variant"])
            cells.add(_normalize(Cell(**raw)))
    if not cells:
        raise SAUError("the grid is empty: every axis needs at least one value")
    if not retain and any(c.stop_at == "retain" for c in cells):
        raise SAUError(
            "--stop-at retain (in both presets too) stops at the retain model's level: "
            "give --retain-model"
        )
    for cell in list(cells):  # dependencies
        if retain:
            cells.add(Cell(seed=cell.seed, variant="retain", dtype=cell.dtype))
        cells.add(Cell(seed=cell.seed, variant="target", dtype=cell.dtype))
        if cell.is_reference:
            continue
        v = VARIANTS[cell.variant]
        if v.start == "pruned" or v.prune_after:
            cells.add(_normalize(replace(cell, variant="target")))
        if v.prune_after or alias_of(cell) is not None:
            cells.add(dense_of(cell))
    return sorted(cells, key=_order)


def _order(cell: Cell):
    # dtype and seed first (one loaded corpus/model at a time; a model of your own is
    # loaded once per dtype), then references, dense runs, and per pruned model: its
    # target row, the runs on it, the prune-after runs.
    if cell.variant == "retain":
        group = (0,)
    elif cell.is_reference and cell.sparsity == 0.0:
        group = (1,)
    elif not cell.is_reference and VARIANTS[cell.variant].start == "dense":
        group = (2 if not VARIANTS[cell.variant].prune_after else 4,)
    else:
        group = (3,)
    rank = 0 if cell.is_reference else 1
    return (
        DTYPES.index(cell.dtype),
        cell.seed,
        group,
        cell.prune,
        cell.sparsity,
        rank,
        cell.variant,
        cell.stop_at,
        cell.method or "",
        cell.lr or 0.0,
        cell.k or 0.0,
        cell.alpha or 0.0,
        cell.rounding or "",
        cell.state_bits or 0,
    )
