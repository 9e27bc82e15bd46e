"""Reading and writing QA files (JSONL or a JSON list, TOFU's field names)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sau.errors import DataFormatError

REQUIRED_FIELDS = ("question", "answer")


def _dump_row(row: dict) -> str:
    # sort_keys + ensure_ascii=False: byte-identical output for equal rows, readable names.
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write `rows` (list of JSON-able dicts) to `path`, one object per '\\n'-ended line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(_dump_row(row) + "\n")
    return path


def write_splits(ds, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write each split of `ds` (a `QADataset`) to `out_dir/<split>.jsonl`.

    Returns split name -> path. Same dataset -> byte-identical files.
    """
    out_dir = Path(out_dir)
    return {
        name: write_jsonl(rows, out_dir / f"{name}.jsonl") for name, rows in ds.splits().items()
    }


def _check_row(row, where: str) -> dict:
    """Validate one row; `where` ("file:line" or "file (item i)") prefixes any error."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [f for f in REQUIRED_FIELDS if not isinstance(row.get(f), str)]
    if missing:
        raise DataFormatError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
    para = row.get("paraphrased_answer")
    if para is not None and not isinstance(para, str):
        raise DataFormatError(f"{where}: paraphrased_answer must be a string")
    pert = row.get("perturbed_answer")
    if isinstance(pert, str):  # some TOFU exports store a single perturbed answer
        row = {**row, "perturbed_answer": [pert]}
    elif pert is not None and not (
        isinstance(pert, list) and all(isinstance(p, str) for p in pert)
    ):
        raise DataFormatError(f"{where}: perturbed_answer must be a string or a list of strings")
    return row


def load_qa(path: str | os.PathLike) -> list[dict]:
    """Read QA rows from a JSONL file or a file holding one JSON list of objects.

    Each row must have string `question` and `answer`; `paraphrased_answer` (str) and
    `perturbed_answer` (list[str]; a single str is wrapped in a list) are optional.
    Blank lines are skipped.

    Raises:
        DataFormatError: one line naming the file (and line, or list item) that is
            missing, not valid JSON, or lacks a required field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: cannot read: {err}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        if not isinstance(items, list):
            raise DataFormatError(f"{path}: expected a JSON list of objects or JSON lines")
        return [_check_row(item, f"{path} (item {i})") for i, item in enumerate(items)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
        rows.append(_check_row(item, f"{path}:{lineno}"))
    return rows


def require_fields(rows: list[dict], names: tuple[str, ...], where: str) -> list[dict]:
    """Check that every row (as `load_qa` returns them) carries each field in `names`.

    `where` names the rows in the error (a file path, or "real_authors"). Returns `rows`.

    Raises:
        DataFormatError: one line naming `where`, the first row lacking a field, and the
            field (an empty string or list counts as missing).
    """
    for i, row in enumerate(rows):
        missing = [n for n in names if not row.get(n)]
        if missing:
            raise DataFormatError(
                f"{where} (row {i}): missing field(s) {', '.join(missing)}, "
                f"needed here ({', '.join(names)})"
            )
    if not rows:
        raise DataFormatError(f"{where}: no rows")
    return rows
