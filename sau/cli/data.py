"""`sau data`: write the synthetic corpus's splits as JSONL files."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sau data` on `subparsers` (an argparse sub-parsers action)."""
    parser = subparsers.add_parser(
        "data",
        help="write the synthetic forget/retain/holdout/general QA splits",
        description="Generate the deterministic synthetic corpus of fictitious people and "
        "write forget.jsonl, retain.jsonl, holdout.jsonl and general.jsonl into --out.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument(
        "--forget-fraction",
        type=float,
        default=0.1,
        choices=(0.01, 0.05, 0.1),
        help="share of people in the forget split (default 0.1)",
    )
    parser.add_argument(
        "--n-people", type=int, default=100, metavar="N", help="number of people (default 100)"
    )
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Generate and write the splits; prints one line per file. Returns 0.

    --out follows sau.lab.outdir's rules: new, empty or an earlier sau output (replaced
    whole, atomically); anything else is refused before a file is written.
    """
    from pathlib import Path

    from sau.errors import SAUError
    from sau.lab.data import generate, write_splits
    from sau.lab.outdir import OutLock, check_out_dir, publish, staging_dir

    out = Path(args.out).expanduser()
    check_out_dir(out)
    try:
        ds = generate(seed=args.seed, n_people=args.n_people, forget_fraction=args.forget_fraction)
    except ValueError as err:
        raise SAUError(str(err)) from None
    with OutLock(out), staging_dir(out) as tmp:
        written = write_splits(ds, tmp)
        publish(tmp, out, command="data")
    for name, path in written.items():
        print(f"{name}: {len(ds.splits()[name])} rows -> {out / path.name}")
    return 0
