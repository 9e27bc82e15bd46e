"""Type and range checks for settings dataclasses (PipelineConfig, UnlearnConfig).

Values arrive from JSON config files and the command line, so anything can show up:
2.5 epochs, "4" as a batch size, NaN weights, booleans where numbers belong. `check`
validates every field of a dataclass against its annotation (bool, int, float, str,
tuple; `| None` allows None) and an optional range, and raises one SAUError line.
"""

from __future__ import annotations

import math
from dataclasses import fields

from sau.errors import SAUError

__all__ = ["INF", "check"]

INF = math.inf
_KINDS = ("bool", "int", "float", "str", "tuple")
_WORDS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "tuple": "a list",
}


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
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind == "str":
        return isinstance(value, str)
    return isinstance(value, (tuple, list))


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if hi == INF:
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


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
        lo, hi, lo_open, hi_open = rule
        below = value <= lo if lo_open else value < lo
        above = value >= hi if hi_open else value > hi
        if below or above:
            raise SAUError(
                f"{label(f.name)} must be {_range_text(lo, hi, lo_open, hi_open)}, got {value}"
            )
