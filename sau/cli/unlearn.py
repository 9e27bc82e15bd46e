"""`sau unlearn`: unlearn a forget set from your own (pruned) model and evaluate it.

    sau unlearn --model pruned/ --forget forget.jsonl --retain retain.jsonl --out unlearned/
    sau unlearn ... --out unlearned/ --resume      # after Ctrl-C / SIGTERM

Files are TOFU-format QA rows (JSONL or a JSON list): `question`, `answer`, optional
`paraphrased_answer` and `perturbed_answer` (needed for truth ratios / forget quality).
Everything is loaded and checked before anything is written. Work in progress
(checkpoints) lives in a hidden sibling `.<out>.partial/`; --out appears only when the
run has finished, holding the unlearned model (save_pretrained), results.json,
report.md and plots. --resume continues only the same run: the settings and the content
of every input must match the interrupted run's fingerprint (sau.cli.fingerprint). Output
directory rules (never replace what sau did not write, one run per --out): sau.lab.outdir.
--eval-protocol open-unlearning also evaluates the saved model as open-unlearning's TOFU
evaluator does (sau.lab.eval.open_unlearning) and writes TOFU_EVAL.json and
TOFU_SUMMARY.json beside it; results.json and report.md keep our protocol's numbers.
"""

from __future__ import annotations

import argparse
import re
import sys
from decimal import Decimal
from pathlib import Path

from sau.cli.demo import add_common_options, build_config
from sau.errors import RunFailedError, SAUError
from sau.lab.variants import VARIANTS
from sau.names import LAYER_AMPLIFY_MODES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sau unlearn`."""
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
        choices=tuple(VARIANTS),
        help="sau (SAUAdamW with --k/--alpha/--amplify; default) or a comparison variant",
    )
    p.add_argument(
        "--amplify",
        choices=LAYER_AMPLIFY_MODES,
        default=None,
        help="SAU: apply w to the gradient (paper's form; under Adam it acts only "
        "through eps) or to the update (default update)",
    )
    p.add_argument(
        "--in-backward",
        action="store_true",
        help="SAUAdamW steps each weight inside backward and frees its gradient at once "
        "(bitwise the same result; no gradient accumulation). With a retain term "
        "(graddiff, npo, simnpo) it lowers the peak only with --joint-forward",
    )
    p.add_argument(
        "--joint-forward",
        action="store_true",
        help="forget and retain rows in one forward pass, so each weight is used once "
        "per backward (what --in-backward needs to save memory); equal up to rounding",
    )
    p.add_argument(
        "--compact-grads",
        action="store_true",
        help="SAUAdamW keeps only grad[G] of each planned weight from backward and frees "
        "the dense gradient at once (bitwise the same result; accumulation and clipping "
        "work; not with --in-backward)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward instead of keeping them (transformers' "
        "gradient_checkpointing_enable): less memory, about a third more compute",
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
        help="continue an interrupted run with the same --out, settings and input files "
        "(refused, naming what changed, when they differ)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="discard an interrupted run's checkpoints in .<out>.partial and start over",
    )
    p.add_argument(
        "--checkpoint-every",
        type=parse_checkpoint_every,
        default=None,
        metavar="N|Ts|Tm",
        help="checkpoint every N steps (e.g. 25) or every T seconds/minutes of work "
        "(e.g. 60s, 5m; default 60s); a stop and the end always checkpoint",
    )
    p.add_argument(
        "--saliency-memory",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="at most SIZE bytes of saliency accumulators at a time (e.g. 4GiB, 512MiB, "
        "1e9): the weights are scored in groups, one pass over the forget rows each, "
        "bitwise the same saliency (default: one pass, every accumulator at once)",
    )
    _add_eval_protocol_options(p)
    add_common_options(p)
    p.set_defaults(run=run)
    return p


# The open-unlearning protocol's input files: option -> (attribute, help).
_OU_FILES = {
    "--retain-perturbed": "TOFU retain_perturbed rows (question, answer, paraphrased_answer, "
    "perturbed_answer): retain probability, ROUGE and truth ratio",
    "--real-authors": "TOFU real_authors_perturbed rows (question, answer, perturbed_answer)",
    "--world-facts": "TOFU world_facts_perturbed rows (question, answer, perturbed_answer)",
}


def _add_eval_protocol_options(p: argparse.ArgumentParser) -> None:
    """--eval-protocol and the files the open-unlearning protocol reads."""
    p.add_argument(
        "--eval-protocol",
        choices=("sau", "open-unlearning"),
        default="sau",
        help="sau (default): our evaluation in results.json and report.md; "
        "open-unlearning: also evaluate the unlearned model as open-unlearning's TOFU "
        "evaluator does and write TOFU_EVAL.json / TOFU_SUMMARY.json in its format "
        "(needs --retain-perturbed, --real-authors and --world-facts; the forget rows need "
        "paraphrased_answer and perturbed_answer)",
    )
    for option, help_text in _OU_FILES.items():
        p.add_argument(option, default=None, metavar="FILE", help=f"open-unlearning: {help_text}")
    p.add_argument(
        "--retain-logs",
        default=None,
        metavar="FILE",
        help="open-unlearning: the retain model's TOFU_EVAL.json written by open-unlearning "
        "(or by sau): forget quality and privleak's reference",
    )
    p.add_argument(
        "--template-args",
        default=None,
        metavar="FILE",
        help="open-unlearning: a YAML/JSON file of its template_args (e.g. its "
        "configs/model/<model>.yaml): system prompt, user/assistant tags; default: the "
        "tokenizer's chat template if it has one, else Question:/Answer: tags",
    )


def _open_unlearning_inputs(args):
    """The open-unlearning protocol's loaded inputs, or None under --eval-protocol sau.

    Raises:
        SAUError: one line, for a required file left out or an option that needs
            --eval-protocol open-unlearning.
    """
    from sau.lab.eval.open_unlearning import OpenUnlearningInputs

    given = [o for o in (*_OU_FILES, "--retain-logs", "--template-args") if _ou_path(args, o)]
    if args.eval_protocol == "sau":
        if given:
            raise SAUError(f"{given[0]} is read only with --eval-protocol open-unlearning")
        return None
    missing = [o for o in _OU_FILES if not _ou_path(args, o)]
    if missing:
        raise SAUError(
            f"--eval-protocol open-unlearning needs {' and '.join(missing)} FILE "
            "(TOFU-format rows, as open-unlearning's TOFU datasets have them)"
        )
    return OpenUnlearningInputs.from_files(
        forget=args.forget,
        holdout=args.holdout,
        **{o[2:].replace("-", "_"): _ou_path(args, o) for o in _OU_FILES},
        retain_logs=args.retain_logs,
        template_args=args.template_args,
    )


def _ou_path(args, option: str):
    return getattr(args, option[2:].replace("-", "_"))


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS.update(kib=2**10, mib=2**20, gib=2**30, tib=2**40)


def parse_size(text: str) -> int:
    """'4GiB' -> 4294967296, '512MiB', '1.5kB' -> 1500, '1e9', '1000' -> bytes (an int >= 1).

    A number (integer, decimal or exponent) and an optional unit, case-insensitive: B, kB,
    MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024). Fractions of a
    byte are dropped.

    Raises:
        argparse.ArgumentTypeError: anything else, less than 1 byte or more than 2**63.
    """
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    try:
        value = Decimal(match.group(1)) * unit if unit else Decimal("NaN")
    except ArithmeticError:  # not a number (InvalidOperation), or overflow
        value = Decimal("NaN")
    if not (value.is_finite() and 1 <= value <= 2**63):
        raise argparse.ArgumentTypeError(
            f"expected a size from 1 byte to 2**63 bytes like 4GiB, 512MiB, 1e9 or 1000000, "
            f"got {text!r}"
        )
    return int(value)


def parse_checkpoint_every(text: str) -> tuple[int, float]:
    """'25' -> (25 steps, 0 s); '90s' -> (0, 90.0); '5m' -> (0, 300.0)."""
    unit = {"s": 1.0, "m": 60.0}.get(text[-1:])
    try:
        value = float(text[:-1]) if unit else int(text)
    except ValueError:
        value = -1
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected N steps or a time like 60s / 5m, got {text!r}")
    return (0, value * unit) if unit else (value, 0.0)


def _inputs(args, cfg):
    """Load and check every input (rows, models, their fit) in cfg.dtype; writes nothing."""
    from sau.lab.inputs import Inputs

    return Inputs.from_files(
        args.model,
        args.forget,
        args.retain,
        args.holdout,
        args.general,
        args.retain_model,
        dtype=cfg.dtype,
        max_new_tokens=cfg.max_new_tokens,
    )


def _fingerprint(args, cfg) -> dict:
    """Every setting that determines the result and the content hash of every input."""
    from dataclasses import asdict

    from sau.cli.fingerprint import fingerprint

    settings = asdict(cfg)
    # When to checkpoint, where the step runs, which gradient entries are kept and how
    # many passes the saliency takes (bitwise equal) do not change the result.
    # Gradient checkpointing recomputes the same activations: it changes memory only.
    for name in (
        "checkpoint_every", "checkpoint_seconds", "in_backward", "saliency_memory",
        "compact_grads", "gradient_checkpointing",
    ):  # fmt: skip
        settings.pop(name, None)
    names = {"model": "model", "retain_model": "retain model"}
    names.update({n: f"{n} file" for n in ("forget", "retain", "holdout", "general")})
    if args.eval_protocol != "sau":  # the default run's fingerprint stays as it was
        settings["eval_protocol"] = args.eval_protocol
        ou = ("retain_perturbed", "real_authors", "world_facts", "retain_logs", "template_args")
        names.update({n: f"{n.replace('_', '-')} file" for n in ou})
    return fingerprint(settings, {label: getattr(args, n) for n, label in names.items()})


def _prepare_work(work: Path, args, fp: dict) -> None:
    """Create, resume-check or (--force) discard the work directory; under the lock."""
    from sau.cli import fingerprint as fpmod
    from sau.lab.outdir import is_work_dir, make_work_dir, remove_work_dir

    if work.exists() or work.is_symlink():
        if not is_work_dir(work):
            raise SAUError(f"{work}: exists and was not created by sau; move it away")
        if args.resume:
            changed = fpmod.differences(fpmod.read(work / "fingerprint.json"), fp)
            if changed:
                raise SAUError(
                    f"--resume: the interrupted run in {work} differs in {'; '.join(changed)}; "
                    "rerun with its settings, or with --force instead of --resume to start over"
                )
            return
        if not args.force:
            raise SAUError(
                f"{work} holds an interrupted run; continue it with --resume, or start over "
                "with --force (which deletes its checkpoints)"
            )
        remove_work_dir(work)
        print(f"sau unlearn: --force: removed the interrupted run in {work}", file=sys.stderr)
    elif args.resume:
        print(f"sau unlearn: nothing to resume in {work}; starting fresh", file=sys.stderr)
    make_work_dir(work)
    fpmod.write(fp, work / "fingerprint.json")


def _config(args):
    """The validated PipelineConfig: defaults, --config, options, --checkpoint-every."""
    from dataclasses import replace

    from sau.lab.pipeline import PipelineConfig

    cfg = build_config(args, PipelineConfig(prune="none", variants=(args.variant,)))
    if args.variant not in cfg.variants:  # its model is the one saved: refuse before the run
        raise SAUError(
            f"{args.config}: its variants ({', '.join(cfg.variants)}) leave out --variant "
            f"{args.variant}, whose model sau unlearn saves; add it there or pick one of them"
        )
    if args.checkpoint_every is not None:
        steps, seconds = args.checkpoint_every
        cfg = replace(cfg, checkpoint_every=steps, checkpoint_seconds=seconds)
    return cfg


def _has_checkpoint(work: Path) -> bool:
    # single-process checkpoint.pt, or a sharded one (torchrun; sau.unlearn.sharded_checkpoint)
    return any(work.glob("checkpoints/*/*.pt")) or any(work.glob("checkpoints/*/sharded/latest"))


def run(args) -> int:
    """`sau unlearn`, in one process or under torchrun (one process per rank, FSDP2).

    Under torchrun (RANK and WORLD_SIZE set) every rank loads the inputs, checks that
    they match rank 0's, and computes its share; rank 0 alone locks, prints and writes.
    """
    from sau.distributed import from_env, launched_by_torchrun

    if not launched_by_torchrun():
        return _run(args, None)
    import torch.distributed as dist

    from sau.cli.main import error_line
    from sau.distributed import GroupError

    dp = from_env()
    try:
        return _run(args, dp)
    except GroupError as err:
        # Every rank holds it and is still in the group: rank 0 says it, then they part
        # together (torchrun stops the other ranks once one exits, which could cut rank 0
        # short of its line).
        if dp.is_main:
            print(error_line(args.command, err), file=sys.stderr, flush=True)
        dist.barrier()
        return getattr(err, "exit_code", 2)
    except SAUError as err:
        if dp.is_main:  # every rank fails alike; rank 0 says it once
            raise
        return getattr(err, "exit_code", 2)
    finally:
        dist.destroy_process_group()


def _run(args, dp) -> int:
    """Validate and load everything, run the pipeline, save model and report atomically."""
    import contextlib

    from sau.lab.outdir import OutLock, remove_work_dir, work_dir_of
    from sau.lab.report import format_table

    main = dp is None or dp.is_main
    progress = _progress(args, main)
    cfg, out, inputs, fp, ou = _checked_inputs(args, dp)
    work = work_dir_of(out)
    with contextlib.ExitStack() as held:

        def lock_and_prepare():
            held.enter_context(OutLock(out))
            _prepare_work(work, args, fp)

        # Under torchrun rank 0 alone locks and prepares; its refusal (a second run on
        # --out, an interrupted run) reaches every rank, which then stop with it.
        if dp is None:
            lock_and_prepare()
        else:
            dp.on_main(lock_and_prepare)
        try:
            results = _run_pipeline(inputs, cfg, args, dp, work, progress, main)
            if not main:
                return 0
            _save(results, inputs, args, out, ou)
        except KeyboardInterrupt as stop:
            return _interrupted(stop, main, work)
        except BaseException as err:
            # Nothing resumable (or a run that cannot succeed): leave no work dir behind.
            if main and (isinstance(err, RunFailedError) or not _has_checkpoint(work)):
                remove_work_dir(work)
            raise
        remove_work_dir(work)
    print(format_table(results.reference + results.rows))
    print(f"\nsaved the unlearned model and its evaluation to {out}")
    return 0


def _checked_inputs(args, dp):
    """(config, --out, loaded inputs, fingerprint, open-unlearning inputs or None), every
    input loaded and checked before
    anything is written. Under torchrun every rank loads; a refusal on any rank stops every
    rank with the same line, and the ranks must have loaded the same files and settings."""
    import json

    from sau.lab.outdir import check_out_dir

    def load():
        if args.resume and args.force:
            raise SAUError("--resume and --force exclude each other (continue, or start over)")
        cfg = _config(args)
        _check_world(dp, cfg)
        out = Path(args.out).expanduser()
        check_out_dir(out, inputs=_input_paths(args))
        ou = _open_unlearning_inputs(args)
        inputs = _inputs(args, cfg)
        return cfg, out, inputs, _fingerprint(args, cfg), ou

    if dp is None:
        return load()
    cfg, out, inputs, fp, ou = dp.run_all(load)
    dp.agree(json.dumps(fp, sort_keys=True, default=str), "input files or settings")
    return cfg, out, inputs, fp, ou


def _check_world(dp, cfg) -> None:
    """Refuse, before any work, what cannot run on this many ranks."""
    odd = [v for v in cfg.variants if dp is not None and not VARIANTS[v].sharded]
    if odd:
        able = ", ".join(v for v, spec in VARIANTS.items() if spec.sharded)
        raise SAUError(f"--variant {odd[0]} does not run under torchrun (FSDP2); use {able}")
    if dp is not None and dp.world > cfg.batch_size:
        raise SAUError(
            f"world size {dp.world} is larger than the global batch ({cfg.batch_size} rows): "
            "use fewer processes or a larger batch_size (--config)"
        )


def _input_paths(args) -> tuple:
    """Every input path, so that --out can never be one of them (or hold one)."""
    return (
        args.model,
        args.retain_model,
        args.forget,
        args.retain,
        args.holdout,
        args.general,
        args.config,
        *(_ou_path(args, o) for o in (*_OU_FILES, "--retain-logs", "--template-args")),
    )


def _progress(args, main: bool) -> bool:
    """Show progress bars on rank 0 unless --no-progress (then transformers' too are off)."""
    progress = not args.no_progress and main
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return progress


def _run_pipeline(inputs, cfg, args, dp, work: Path, progress: bool, main: bool):
    from sau.lab.pipeline import run_pipeline

    return run_pipeline(
        inputs,
        cfg,
        progress=progress,
        work_dir=work / "checkpoints",
        resume=args.resume,
        data_parallel=dp,
        log=print if main else (lambda *a, **k: None),
    )


def _save(results, inputs, args, out: Path, ou=None) -> None:
    """Write model, tokenizer and report (and, with `ou`, open-unlearning's TOFU_EVAL.json
    and TOFU_SUMMARY.json of the saved model) to a staging dir, then publish it as --out."""
    from sau.lab.eval.open_unlearning import summarize, write_eval_logs
    from sau.lab.outdir import publish, staging_dir
    from sau.lab.report import write_report

    model = results.models[args.variant]
    logs = None
    if ou is not None:
        print(f"evaluating {args.variant} with the open-unlearning protocol")
        logs = ou.evaluate(model, inputs.tok)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in summarize(logs).items())
        print(f"open-unlearning protocol: {summary}")
    with staging_dir(out) as stage:
        model.save_pretrained(stage)
        inputs.tok.save_pretrained(stage)
        write_report(results, stage, title=f"sau unlearn ({args.variant}) of {args.model}")
        if logs is not None:
            write_eval_logs(logs, stage)
        publish(stage, out, command="unlearn")


def _interrupted(stop: KeyboardInterrupt, main: bool, work: Path) -> int:
    """Exit code after a stop by a signal (128 + signum: SIGINT 130, SIGTERM 143): keep a
    resumable checkpoint, else clean up."""
    from sau.cli.main import stop_message
    from sau.lab.outdir import remove_work_dir

    what, status = stop_message(stop)
    if not main:
        return status
    if not _has_checkpoint(work):
        remove_work_dir(work)
        raise stop
    print(
        f"sau unlearn: {what}; checkpoint kept in {work}; rerun the same command with "
        "--resume to continue",
        file=sys.stderr,
    )
    return status
