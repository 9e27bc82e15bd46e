"""`sau prune`: prune a saved model (magnitude or Wanda, unstructured or N:M) and save it.

    sau prune --model DIR --method wanda --sparsity 0.5 --calib forget.jsonl --out DIR2
    sau prune --model DIR --method magnitude --nm 2:4 --out DIR2

The output directory is a plain transformers checkpoint (weights + tokenizer), loadable
with ``AutoModelForCausalLM.from_pretrained``; pruned entries are stored as exact zeros.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sau.errors import SAUError


def _parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M such as 2:4, got {text!r}") from None
    if not 0 < n <= m:
        raise argparse.ArgumentTypeError(f"N:M needs 0 < N <= M, got {text!r}")
    return n, m


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sau prune` on the CLI's sub-parser collection."""
    p = subparsers.add_parser(
        "prune",
        help="prune a model with magnitude or Wanda (unstructured or N:M)",
        description=(
            "Zero the lowest-scoring weights of the Linear layers inside the decoder "
            "blocks (not embeddings, not the LM head) and save the pruned model."
        ),
    )
    p.add_argument("--model", required=True, help="saved model directory (transformers layout)")
    p.add_argument("--method", choices=("magnitude", "wanda"), default="magnitude")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction in [0, 1); default 0.5")
    p.add_argument(
        "--nm",
        type=_parse_nm,
        default=None,
        metavar="N:M",
        help="semi-structured pattern, e.g. 2:4 (overrides --sparsity)",
    )
    p.add_argument(
        "--calib",
        default=None,
        metavar="FILE.jsonl",
        help="TOFU-format QA rows for Wanda's calibration (question + answer)",
    )
    p.add_argument(
        "--calib-rows",
        type=int,
        default=128,
        help="use at most this many calibration rows (default 128)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR2",
        help="where to save the pruned model (default: print the table only)",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)
    return p


def _load(model_dir: str):
    try:
        from sau.models.io import load_model
    except ImportError:  # the loader module is optional; fall back to transformers
        load_model = None
    if load_model is not None:
        return load_model(model_dir)
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise SAUError(f"{path}: no config.json (not a saved model directory)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SAUError(f"{path}: cannot load model: {str(err).splitlines()[0]}") from None
    return model, tok


def _read_rows(path: str) -> list[dict]:
    try:
        from sau.data.io import load_qa
    except ImportError:
        load_qa = None
    if load_qa is not None:
        return load_qa(path)
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise SAUError(f"{path}: cannot read: {err}") from None
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SAUError(f"{path}:{i}: invalid JSON: {err.msg}") from None
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise SAUError(f"{path}:{i}: needs 'question' and 'answer'")
            rows.append(row)
    return rows


def calib_batches_from_rows(tok, rows: list[dict], batch_size: int):
    """Right-padded ``(input_ids [B, T], attention_mask [B, T])`` LongTensor pairs of
    prompt + answer text, rendered with `sau.prompt`, for Wanda's calibration."""
    import torch

    from sau.prompt import format_answer, format_prompt

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    seqs = [
        list(tok(format_prompt(r["question"]))["input_ids"])
        + list(tok(format_answer(r["answer"]), add_special_tokens=False)["input_ids"])
        for r in rows
    ]
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        batches.append((ids, mask))
    return batches


def run(args) -> int:
    """Load, prune, print the per-layer table, and save when ``--out`` is given."""
    from sau.prune import prune_model

    if not 0.0 <= args.sparsity < 1.0:
        raise SAUError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.method == "wanda" and not args.calib:
        raise SAUError("--method wanda needs --calib FILE.jsonl (calibration questions)")
    if args.no_progress:  # transformers' own load / save bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tok = _load(args.model)
    calib = None
    if args.method == "wanda":
        rows = _read_rows(args.calib)[: args.calib_rows]
        if not rows:
            raise SAUError(f"{args.calib}: no calibration rows")
        calib = calib_batches_from_rows(tok, rows, args.batch_size)
    try:
        report = prune_model(
            model,
            args.method,
            args.sparsity,
            nm=args.nm,
            calib_batches=calib,
            progress=not args.no_progress,
        )
    except ValueError as err:  # e.g. N:M on a width not divisible by M
        raise SAUError(str(err)) from None
    print(report.to_json() if args.json else report.to_text())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "prune_report.json").write_text(report.to_json() + "\n", encoding="utf-8")
        print(f"saved pruned model to {out}")
    return 0
