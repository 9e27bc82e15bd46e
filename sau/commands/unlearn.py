"""`sau unlearn`: unlearn a forget set from your own (pruned) model and evaluate it.

    sau unlearn --model pruned/ --forget forget.jsonl --retain retain.jsonl --out unlearned/
    sau unlearn ... --out unlearned/ --resume      # after Ctrl-C / SIGTERM

Files are TOFU-format QA rows (JSONL or a JSON list): `question`, `answer`, optional
`paraphrased_answer` and `perturbed_answer` (needed for truth ratios / forget quality).
Everything is loaded and checked before anything is written. Work in progress
(checkpoints) lives in a hidden sibling `.<out>.partial/`; --out appears only when the
run has finished, holding the unlearned model (save_pretrained), results.json,
report.md and plots.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from sau.commands.demo import add_common_options, build_config, check_out_dir, publish
from sau.errors import SAUError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sau unlearn`."""
    from sau.pipeline import VARIANTS

    p = subparsers.add_parser(
        "unlearn",
        help="unlearn a forget set from your model (SAU by default) and save it",
        description="Load a local transformers model and TOFU-format forget/retain files, "
        "optionally prune, compute forget-set saliency, unlearn with SAUAdamW (or another "
        "variant), evaluate, and save the unlearned model. Resumable after Ctrl-C/SIGTERM.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="local model directory (config.json, weights, tokenizer); "
        "pruned already unless --prune is given",
    )
    p.add_argument("--forget", required=True, metavar="FILE", help="QA rows to forget")
    p.add_argument("--retain", required=True, metavar="FILE", help="QA rows to keep")
    p.add_argument(
        "--holdout",
        default=None,
        metavar="FILE",
        help="QA rows never trained on, for the membership-inference AUC",
    )
    p.add_argument(
        "--general", default=None, metavar="FILE", help="extra QA rows counted in model utility"
    )
    p.add_argument(
        "--retain-model",
        default=None,
        metavar="DIR",
        help="a model trained without the forget set, for forget quality",
    )
    p.add_argument(
        "--variant",
        default="sau",
        choices=("sau",) + VARIANTS,
        help="sau (SAUAdamW with --k/--alpha/--amplify; default) or a comparison variant",
    )
    p.add_argument(
        "--amplify",
        choices=("grad", "update"),
        default=None,
        help="SAU: apply w to the gradient (paper's form; under Adam it acts only "
        "through eps) or to the update (default update)",
    )
    p.add_argument(
        "--in-backward",
        action="store_true",
        help="SAUAdamW steps each weight inside backward and frees its gradient at once "
        "(less peak memory, bitwise the same result; no gradient accumulation)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory: model, results.json, report.md, plots",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run with the same --out and settings",
    )
    add_common_options(p)
    p.set_defaults(run=run)
    return p


def _rows(path: str | None, what: str, required: bool) -> list | None:
    from sau.data import load_qa

    if path is None:
        return None
    rows = load_qa(path)
    if required and not rows:
        raise SAUError(f"{path}: no QA rows in the {what} file")
    return rows


def run(args) -> int:
    """Validate and load everything, run the pipeline, save model and report atomically."""
    from sau.models import load_model
    from sau.pipeline import Inputs, PipelineConfig, run_pipeline
    from sau.report import format_table, write_report

    cfg = build_config(args, PipelineConfig(prune="none", variants=(args.variant,)))
    out = Path(args.out).expanduser()
    check_out_dir(out)
    forget = _rows(args.forget, "forget", True)
    retain = _rows(args.retain, "retain", True)
    holdout = _rows(args.holdout, "holdout", True)
    general = _rows(args.general, "general", True)
    progress = not args.no_progress
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tok = load_model(args.model)
    retain_model = load_model(args.retain_model)[0] if args.retain_model else None
    inputs = Inputs(model, tok, forget, retain, holdout, general, retain_model, source=args.model)

    work = out.parent / f".{out.name}.partial"
    if work.exists() and not args.resume:
        shutil.rmtree(work)  # an old interrupted run the user chose not to resume
    elif args.resume and not (work / "checkpoints").is_dir():
        print(f"sau unlearn: nothing to resume in {work}; starting fresh", file=sys.stderr)
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    try:
        results = run_pipeline(
            inputs, cfg, progress=progress, work_dir=work / "checkpoints", resume=args.resume
        )
    except KeyboardInterrupt:
        print(
            f"sau unlearn: interrupted; checkpoint kept in {work}; rerun the same command "
            "with --resume to continue",
            file=sys.stderr,
        )
        return 130
    stage = work / "result"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    unlearned = results.models[args.variant]
    unlearned.save_pretrained(stage)
    tok.save_pretrained(stage)
    write_report(results, stage, title=f"sau unlearn ({args.variant}) of {args.model}")
    publish(stage, out)
    shutil.rmtree(work, ignore_errors=True)
    print(format_table(results.reference + results.rows))
    print(f"\nsaved the unlearned model and its evaluation to {out}")
    return 0
