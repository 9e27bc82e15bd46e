"""`sau sweep`: a resumable grid of unlearning runs, with Pareto fronts and durability.

    sau sweep --preset quick --out runs/sweep-quick          # < 2 minutes, a smoke test
    sau sweep --preset paper --seed 0 1 2 --out runs/paper   # the paper's grid
    sau sweep --sparsity 0.3 0.5 --variant masked sau-update --lr 1e-3 3e-3 --out DIR
    sau sweep --preset quick --dtype bfloat16 --rounding kahan stochastic --out DIR
    sau sweep --model pruned/ --forget f.jsonl --retain r.jsonl --retain-model ret/ ...

Each finished cell is its own file under DIR/cells/; rerunning the same command skips
them (resume after a kill, or add axis values to extend a grid). Writes results.csv,
results.json, report.md and plots into DIR. Every input is checked before anything is
written; DIR is new, empty or a sweep's own (sau.lab.outdir.check_sweep_dir).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from sau.lab.variants import DTYPES, VARIANTS
from sau.names import ROUNDINGS, STATE_BITS

__all__ = ["add_parser", "run"]


def _bits(text: str) -> int | str:
    """One --bits value: "nf4", or an int RTN width (range checked by Settings)."""
    if text.lower() == "nf4":
        return "nf4"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int or nf4: {text!r}") from None


def _axis_options(p: argparse.ArgumentParser) -> None:
    axes = p.add_argument_group("grid axes (each replaces that axis of the preset)")
    axes.add_argument("--sparsity", type=float, nargs="+", help="fractions in [0, 1)")
    axes.add_argument(
        "--prune", nargs="+", help="magnitude, wanda, none, or N:M such as 2:4 (wanda-2:4)"
    )
    axes.add_argument(
        "--variant",
        nargs="+",
        help=f"any of {', '.join(VARIANTS)} (sau = sau-update)",
    )
    axes.add_argument("--lr", type=float, nargs="+", help="learning rates")
    axes.add_argument("--k", type=float, nargs="+", help="SAU: fractions of survivors, (0, 1]")
    axes.add_argument("--alpha", type=float, nargs="+", help="SAU: amplification strengths")
    axes.add_argument("--method", nargs="+", help="ga, graddiff, npo, simnpo")
    axes.add_argument("--seed", type=int, nargs="+", help="seeds (corpus, init, data order)")
    axes.add_argument(
        "--stop-at",
        nargs="+",
        dest="stop_at",
        help="none (fixed --epochs) and/or retain (stop once forget ROUGE-L reaches the "
        "retain model's, checked after every epoch, at most --max-epochs)",
    )
    axes.add_argument("--dtype", nargs="+", choices=DTYPES, help="dtypes the models are loaded in")
    axes.add_argument(
        "--rounding",
        nargs="+",
        choices=ROUNDINGS,
        help="SAU: how a step is stored into bfloat16 weights (float32 ignores it)",
    )
    axes.add_argument(
        "--state-bits",
        type=int,
        nargs="+",
        choices=STATE_BITS,
        help="SAU: Adam moments in float32 (32) or 8-bit block-scaled codes",
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sau sweep`."""
    p = subparsers.add_parser(
        "sweep",
        help="run a resumable grid of unlearning runs; Pareto fronts, durability report",
        description="Run a grid of pipeline cells (sparsity x pruning x variant x lr x k x "
        "alpha x method x seed x stop-at x dtype x rounding x state-bits) on the embedded "
        "default or your model, one "
        "result file per cell, skipping cells already done; then write results.csv, "
        "results.json, report.md and plots (degradation curve, Pareto fronts, k x alpha "
        "heatmaps, matched forgetting, 8/4-bit durability).",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--preset",
        choices=("quick", "paper"),
        default=None,
        help="quick: a smoke test (< 2 minutes); paper: the paper's grid (hours on a CPU)",
    )
    _axis_options(p)
    src = p.add_argument_group("what to unlearn (default: the embedded corpus)")
    src.add_argument(
        "--corpus",
        choices=("default", "quick", "tofu"),
        default=None,
        help="embedded corpus and model preset (tofu: TOFU-scale, see README)",
    )
    src.add_argument("--model", metavar="DIR", help="your local model directory instead")
    src.add_argument("--forget", metavar="FILE", help="with --model: QA rows to forget")
    src.add_argument("--retain", metavar="FILE", help="with --model: QA rows to keep")
    src.add_argument("--holdout", metavar="FILE", help="with --model: rows never trained on")
    src.add_argument("--general", metavar="FILE", help="with --model: extra utility rows")
    src.add_argument(
        "--retain-model", metavar="DIR", help="with --model: a model never trained on forget"
    )
    src.add_argument(
        "--cache", metavar="DIR", help="model cache (default $SAU_CACHE or ~/.cache/sau)"
    )
    run_opts = p.add_argument_group("run settings")
    run_opts.add_argument("--epochs", type=int, help="epochs per run (default 5)")
    run_opts.add_argument(
        "--max-epochs", type=int, help="cap for --stop-at retain runs (default 10)"
    )
    run_opts.add_argument(
        "--bits",
        type=_bits,
        nargs="*",
        help="quantization widths to evaluate: ints (RTN) or nf4 (default 8 4)",
    )
    run_opts.add_argument(
        "--compact-grads",
        action="store_true",
        help="SAUAdamW keeps only grad[G] of each planned weight from backward and frees "
        "the dense gradient at once (bitwise the same cells: they are reused either way)",
    )
    run_opts.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward instead of keeping them: less memory, "
        "about a third more compute (bitwise the same cells on the CPU)",
    )
    run_opts.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the cells finished so far; run nothing",
    )
    run_opts.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)
    return p


def _source(args):
    from sau.errors import SAUError
    from sau.lab.sweep import Source
    from sau.lab.sweep.grid import PRESET_SOURCE

    files = ("forget", "retain", "holdout", "general", "retain_model")
    given = [f"--{f.replace('_', '-')}" for f in files if getattr(args, f)]
    if args.model and args.corpus:
        raise SAUError("--model and --corpus exclude each other: your model or the embedded one")
    if given and not args.model:
        raise SAUError(f"{given[0]} is for a sweep on your model: give --model too")
    if args.model:
        return Source(
            corpus=None,
            model=args.model,
            forget=args.forget,
            retain=args.retain,
            holdout=args.holdout,
            general=args.general,
            retain_model=args.retain_model,
            cache=args.cache,
        )
    corpus = args.corpus or PRESET_SOURCE.get(args.preset, "default")
    return Source(corpus=corpus, cache=args.cache)


def _settings(args):
    """The preset's settings with the run options given; checked by run_sweep."""
    from sau.lab.sweep import Settings
    from sau.lab.sweep.grid import PRESET_SETTINGS

    settings = Settings(**PRESET_SETTINGS.get(args.preset, {}))
    for name in ("epochs", "max_epochs"):
        if getattr(args, name) is not None:
            settings = replace(settings, **{name: getattr(args, name)})
    if args.bits is not None:
        settings = replace(settings, bits=tuple(args.bits))
    for flag in ("compact_grads", "gradient_checkpointing"):
        if getattr(args, flag):
            settings = replace(settings, **{flag: True})
    return settings


def run(args) -> int:
    """Build the grid, run what is missing, print where the report is."""
    from sau.lab.sweep import PRESETS, run_sweep
    from sau.lab.sweep.grid import AXES

    t0 = time.perf_counter()
    blocks = PRESETS[args.preset] if args.preset else [{}]
    overrides = {a: getattr(args, a) for a in AXES if getattr(args, a, None) is not None}
    progress = not args.no_progress
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    res = run_sweep(
        blocks,
        args.out,
        source=_source(args),
        settings=_settings(args),
        overrides=overrides,
        progress=progress,
        run_missing=not args.report_only,
        log=print,
    )
    print(
        f"sweep: {len(res.rows)} cells ({res.ran} run now, {res.reused} reused) in "
        f"{time.perf_counter() - t0:.0f} s; report: {args.out}/report.md, results.csv"
    )
    return 0
