"""`sau prune`: prune a saved model (magnitude or Wanda, unstructured or N:M) and save it.

    sau prune --model DIR --method wanda --sparsity 0.5 --calib forget.jsonl --out DIR2
    sau prune --model DIR --method magnitude --nm 2:4 --out DIR2

The output directory is a plain transformers checkpoint (weights + tokenizer), loadable
with ``AutoModelForCausalLM.from_pretrained``; pruned entries are stored as exact zeros.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from sau.errors import SAUError
from sau.names import PRUNE_METHODS


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
            "Zero the lowest-scoring weights of the Linear, Conv1D and fused-expert "
            "layers inside the decoder blocks (each expert on its own; not embeddings, "
            "norms, routers or the LM head) and save the pruned model. Only Wanda loads "
            "the tokenizer."
        ),
    )
    p.add_argument("--model", required=True, help="saved model directory (transformers layout)")
    p.add_argument("--method", choices=PRUNE_METHODS, default="magnitude")
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
        help="where to save the pruned model (default: print the table only); new, empty "
        "or an earlier sau output, never --model itself",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)
    return p


# What a tokenizer may be saved as (transformers' names); copied beside the pruned model
# when the tokenizer was not loaded (magnitude pruning needs none).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _copy_tokenizer_files(src: Path, out: Path) -> list[str]:
    """Copy the source directory's tokenizer files into out; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def _check_args(args) -> None:
    if not 0.0 <= args.sparsity < 1.0:
        raise SAUError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.method == "wanda" and not args.calib:
        raise SAUError("--method wanda needs --calib FILE.jsonl (calibration questions)")
    for flag, value in (("--calib-rows", args.calib_rows), ("--batch-size", args.batch_size)):
        if value < 1:
            raise SAUError(f"{flag} must be >= 1, got {value}")


def _calibration(args, model, tok) -> list:
    """Wanda's calibration batches from --calib, checked against the model's context."""
    from sau.batching import calibration_batches
    from sau.lab.data.io import load_qa
    from sau.lab.inputs import check_row_lengths, model_context

    rows = load_qa(args.calib)[: args.calib_rows]
    if not rows:
        raise SAUError(f"{args.calib}: no calibration rows")
    check_row_lengths(tok, rows, model_context(model), args.calib)
    return calibration_batches(tok, rows, args.batch_size)


def run(args) -> int:
    """Load, prune, print the per-layer table, and save when ``--out`` is given."""
    from sau.lab.inputs import check_finite_weights
    from sau.lab.models.io import load_model
    from sau.prune import prunable_weights, prune_model
    from sau.weights import describe_weights

    _check_args(args)
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        from sau.lab.outdir import check_out_dir

        check_out_dir(out, inputs=(args.model, args.calib))  # never over the input model
    if args.no_progress:  # transformers' own load / save bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # A tokenizer is needed only to turn Wanda's calibration text into tokens.
    model, tok = load_model(args.model, tokenizer=args.method == "wanda")
    check_finite_weights(model, args.model)  # as `sau unlearn` and `sau sweep` check it
    found = prunable_weights(model)
    if not found:
        raise SAUError(
            f"{args.model}: nothing to prune: no nn.Linear, Conv1D or fused experts weight "
            "inside the model's decoder blocks"
        )
    # stdout stays pure JSON with --json
    print(f"found {describe_weights(found)}", file=sys.stderr if args.json else sys.stdout)
    calib = _calibration(args, model, tok) if args.method == "wanda" else None
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
    if out is not None:
        from sau.lab.outdir import OutLock, publish, staging_dir

        with OutLock(out), staging_dir(out) as tmp:
            model.save_pretrained(tmp)
            if tok is not None:
                tok.save_pretrained(tmp)
            else:
                _copy_tokenizer_files(Path(args.model), tmp)
            (tmp / "prune_report.json").write_text(report.to_json() + "\n", encoding="utf-8")
            publish(tmp, out, command="prune")
        print(f"saved pruned model to {out}")
    return 0
