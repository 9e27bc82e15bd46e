"""Range checks in one style: a scalar where it enters the library, or a settings dataclass.

A range is ``(lo, hi, lo_open, hi_open)``: ``(0, 1, True, False)`` is (0, 1],
``(0, INF, False, False)`` is >= 0. A number is a real, finite value that is not a bool.

- `check_number` checks one hyper-parameter where it enters (SAUAdamW's lr when a param
  group is added, plan_selection's alpha) and raises ValueError.
- `check` checks every field of a settings dataclass (UnlearnConfig and the configs built
  on it) against its annotation (bool, int, float, str, tuple; ``| None`` allows None) and
  a range. Those values come from JSON files and the command line, so anything can show
  up (2.5 epochs, "4" as a batch size, NaN weights); it raises one SAUError line.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import fields

from sau.errors import SAUError

__all__ = ["FRACTION", "INF", "NON_NEGATIVE", "check", "check_number", "is_number"]

INF = math.inf
FRACTION = (0, 1, True, False)  # (0, 1]
NON_NEGATIVE = (0, INF, False, False)  # >= 0
_KINDS = ("bool", "int", "float", "str", "tuple")
_WORDS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "tuple": "a list",
}


def _within(value, rule: tuple) -> bool:
    lo, hi, lo_open, hi_open = rule
    above_lo = value > lo if lo_open else value >= lo
    below_hi = value < hi if hi_open else value <= hi
    return above_lo and below_hi


def _range_text(rule: tuple) -> str:
    lo, hi, lo_open, hi_open = rule
    if hi == INF:
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def is_number(value, rule: tuple = (-INF, INF, False, False)) -> bool:
    """True when `value` is a real, finite number (not a bool) inside range `rule`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value) and _within(value, rule)


def check_number(
    name: str, value, rule: tuple, *, what: str = "a finite number", label: str | None = None
) -> float:
    """`value` as a float, when `is_number(value, rule)`.

    Args:
        name: the argument's name, e.g. "lr".
        value: what the caller passed.
        rule: the allowed range, (lo, hi, lo_open, hi_open).
        what: the kind of value in the message, e.g. "a fraction".
        label: what the message calls the value, default `name` (SAUAdamW passes
            torch.optim's wording, e.g. "learning rate").

    Raises:
        ValueError: "Invalid <label>: <value> (<name> must be <what> <range>)".
    """
    if not is_number(value, rule):
        raise ValueError(
            f"Invalid {label or name}: {value!r} ({name} must be {what} {_range_text(rule)})"
        )
    return float(value)


def _kind(annotation) -> tuple[str | None, bool]:
    parts = [p.strip() for p in str(annotation).split("|")]
    kind = next((k for k in _KINDS if k in parts), None)
    return kind, "None" in parts


def _type_ok(kind: str, value) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return is_number(value)
    if kind == "str":
        return isinstance(value, str)
    return isinstance(value, (tuple, list))


def check(cfg, ranges: dict, label=lambda name: name) -> None:
    """Validate every field of dataclass instance `cfg`.

    Args:
        cfg: a dataclass instance whose field annotations name its types.
        ranges: field name -> (lo, hi, lo_open, hi_open) for numbers, or a tuple of
            allowed values (strings; for a list field, allowed elements).
        label: field name -> the name used in messages (e.g. "--k").

    Raises:
        SAUError: "<label> must be <what>, got <value>" for the first bad field.
    """
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kind, optional = _kind(f.type)
        if kind is None or (value is None and optional):
            continue
        if not _type_ok(kind, value):
            raise SAUError(f"{label(f.name)} must be {_WORDS[kind]}, got {value!r}")
        rule = ranges.get(f.name)
        if rule is None:
            continue
        if isinstance(rule[0], str):  # allowed values
            items = value if kind == "tuple" else [value]
            bad = [v for v in items if v not in rule]
            if bad or (kind == "tuple" and not items):
                got = bad[0] if bad else "nothing"
                raise SAUError(f"{label(f.name)} must be among {', '.join(rule)}, got {got!r}")
            continue
        if not _within(value, rule):
            raise SAUError(f"{label(f.name)} must be {_range_text(rule)}, got {value}")
