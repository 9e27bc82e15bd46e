"""`sau demo`: the embedded default end to end (train or reuse, prune, unlearn, evaluate).

    sau demo                      # full default, <= 10 minutes on a 2-core CPU
    sau demo --quick --out q/     # a small configuration for smoke tests

Writes results.json, report.md and PNG plots into --out. Everything is validated first,
then written into a temporary sibling directory that is renamed to --out at the end, so
a failed or interrupted run leaves --out as it was; --out may only be new, empty or an
earlier sau output (sau.lab.outdir).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from sau.lab.variants import DTYPES
from sau.names import METHODS, PRUNE_CHOICES, ROUNDINGS, STATE_BITS

# --quick: small enough for a smoke test (<= 90 s with training on a 2-core CPU).
QUICK = dict(epochs=4, eval_retain_rows=32, max_new_tokens=16, batch_size=8)


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options `sau demo` and `sau unlearn` share: method, pruning, SAU and training knobs."""
    p.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="unlearning objective (default graddiff): gradient ascent, GradDiff "
        "(forget ascent + retain NLL), NPO (beta 0.1) or SimNPO",
    )
    p.add_argument(
        "--prune",
        choices=PRUNE_CHOICES,
        default=None,
        help="pruning before unlearning (none: the model is already pruned)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction of each layer to prune, in [0, 1) (default 0.5)",
    )
    p.add_argument(
        "--k",
        type=float,
        default=None,
        help="SAU: fraction of each layer's survivors updated, in (0, 1] (default 0.3)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="SAU: amplification strength, w = min(1 + alpha*I_P/I_G, 10) (default 0.1)",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    p.add_argument(
        "--epochs", type=int, default=None, help="passes over the forget set (default 5)"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of data, init and data order (default 0)"
    )
    _precision_options(p)
    p.add_argument(
        "--config",
        metavar="FILE.json",
        default=None,
        help="JSON object of pipeline settings (sau.lab.pipeline.PipelineConfig "
        "fields); command-line options override it",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _precision_options(p: argparse.ArgumentParser) -> None:
    """--dtype, --rounding, --state-bits: how the run stores weights and moments."""
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype the models are loaded in and unlearned in (default float32)",
    )
    p.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default=None,
        help="SAU: how a step is stored into bfloat16 weights (default kahan)",
    )
    p.add_argument(
        "--state-bits",
        type=int,
        choices=STATE_BITS,
        default=None,
        help="SAU: Adam moments in float32 (32) or 8-bit block-scaled codes (default 32)",
    )


def build_config(args, base):
    """PipelineConfig from `base`, then --config, then explicit options; validated."""
    from sau.lab.pipeline import load_config_file

    cfg = load_config_file(args.config, base) if args.config else base
    names = ("method", "prune", "sparsity", "k", "alpha", "lr", "epochs", "seed")
    for name in names + ("dtype", "rounding", "state_bits"):
        value = getattr(args, name, None)
        if value is not None:
            cfg = replace(cfg, **{name: value})
    if getattr(args, "amplify", None):
        cfg = replace(cfg, amplify=args.amplify)
    for flag in ("in_backward", "joint_forward", "compact_grads", "gradient_checkpointing"):
        if getattr(args, flag, False):
            cfg = replace(cfg, **{flag: True})
    if getattr(args, "saliency_memory", None) is not None:
        cfg = replace(cfg, saliency_memory=args.saliency_memory)
    cfg.validate()
    return cfg


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sau demo`."""
    p = subparsers.add_parser(
        "demo",
        help="run the embedded default end to end and print the comparison table",
        description="Generate the synthetic TOFU-like corpus, train (or reuse from cache) "
        "the target and retain models, prune, unlearn with every variant (dense, masked, "
        "sau-grad, sau-update, unlearn-then-prune) and evaluate. No downloads.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small corpus, model and schedule: a smoke test (<= 90 s on 2 cores)",
    )
    p.add_argument(
        "--out",
        default="sau-demo",
        metavar="DIR",
        help="output directory for results.json, report.md, plots (default sau-demo)",
    )
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="where trained default models are cached (default $SAU_CACHE or ~/.cache/sau)",
    )
    add_common_options(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    """Validate, build (or reuse) the default, run the pipeline, write the report."""
    from sau.lab.models.default import default_cache_dir
    from sau.lab.outdir import OutLock, check_out_dir, check_writable_dir
    from sau.lab.pipeline import PipelineConfig

    base = PipelineConfig(quick=True, **QUICK) if args.quick else PipelineConfig()
    cfg = build_config(args, base)
    out = Path(args.out).expanduser()
    cache = Path(args.cache).expanduser() if args.cache else default_cache_dir()
    check_writable_dir(cache, "--cache")
    check_out_dir(out, inputs=(cache, args.config))
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with OutLock(out):  # a second demo on the same --out is refused at once, not at the end
        return _run_locked(args, cfg, out, cache)


def _run_locked(args, cfg, out: Path, cache: Path) -> int:
    from sau.lab.inputs import Inputs
    from sau.lab.models import build_default
    from sau.lab.outdir import publish, staging_dir
    from sau.lab.pipeline import run_pipeline
    from sau.lab.report import format_table, write_report

    progress = not args.no_progress
    t_start = time.perf_counter()
    art = build_default(cache, seed=cfg.seed, quick=cfg.quick, progress=progress)
    t_built = time.perf_counter()
    inputs = Inputs.from_default(art, dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens)
    results = run_pipeline(inputs, cfg, progress=progress)
    results.config["build_seconds"] = t_built - t_start
    results.config["total_seconds"] = time.perf_counter() - t_start

    with staging_dir(out) as tmp:
        write_report(results, tmp, title="SAU demo" + (" (quick)" if cfg.quick else ""))
        publish(tmp, out, command="demo")
    print(format_table(results.rows))
    if results.reference:
        print("\nstarting models:")
        print(format_table(results.reference))
    print(
        f"\nwrote {out}/results.json, report.md, plots "
        f"({results.config['total_seconds']:.0f} s, of which training/cache "
        f"{results.config['build_seconds']:.0f} s)"
    )
    return 0
