"""Run fingerprints: what determines a run's result, so --resume refuses another run.

A fingerprint is a JSON-able dict of every setting that determines the result plus the
SHA-256 of each input's content (`sau.lab.inputs.path_digest`; model directories: their
top-level files, which is all `from_pretrained` reads). `differences` names what changed
between two of them in words a user can act on ("k: 0.3 -> 0.9", "forget file content").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sau.errors import SAUError
from sau.lab.inputs import path_digest

__all__ = ["differences", "fingerprint", "read", "write"]


def fingerprint(settings: dict, inputs: dict[str, str | os.PathLike | None]) -> dict:
    """{"settings": settings (JSON-normalised), "inputs": name -> digest or None}.

    Args:
        settings: every setting that determines the result (numbers, strings, lists).
        inputs: input name ("model", "forget file", ...) -> path, or None when not given.
    """
    try:
        norm = json.loads(json.dumps(settings, sort_keys=True, allow_nan=False))
        digests = {k: (path_digest(p) if p is not None else None) for k, p in inputs.items()}
    except (OSError, TypeError, ValueError) as err:
        raise SAUError(f"cannot fingerprint the run: {err}") from None
    return {"settings": norm, "inputs": digests}


def differences(old: dict, new: dict) -> list[str]:
    """What differs from `old` to `new`, one short phrase per setting or input."""
    out = []
    a, b = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key, 'unset')} -> {b.get(key, 'unset')}")
    a, b = old.get("inputs", {}), new.get("inputs", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key} content" if a.get(key) and b.get(key) else f"{key} given/omitted")
    return out


def write(fp: dict, path: Path) -> None:
    """Write `fp` as JSON (never pickle)."""
    path.write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read(path: Path) -> dict:
    """Read a fingerprint written by `write`; SAUError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SAUError(f"{path}: missing; the interrupted run cannot be checked") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SAUError(
            f"{path}: unreadable ({err}); the interrupted run cannot be checked"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise SAUError(f"{path}: not a sau run fingerprint")
    return data
