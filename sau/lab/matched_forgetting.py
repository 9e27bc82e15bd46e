"""Selection options at matched forgetting: run an lr grid, then interpolate.

Each variant is run at every learning rate of a grid; for each seed and pruning method the
learning rate at which its forget ROUGE-L equals f x the retain model's (f = 0.9, 1.0,
1.1) is interpolated linearly in log(lr) between the two grid points that bracket it
(the first crossing from the smallest lr), and utility, log10 forget quality and MIA AUC
are interpolated at the same point. Comparing variants there asks which one keeps the
most utility for the same amount of forgetting, instead of at the same learning rate.

    python -m sau.lab.matched_forgetting run --out runs/mf.jsonl [--seeds 0 1 2] ...
    python -m sau.lab.matched_forgetting quantized runs/mf.jsonl --sweep-dir runs/q4 \
        --out runs/mf-q4.jsonl [--seeds 0 1 2]
    python -m sau.lab.matched_forgetting summarize runs/mf.jsonl runs/mf-q4.jsonl > table.md

`run` appends one JSON line per (seed, prune, lr, variant) and skips combinations already
in the file, so an interrupted run resumes. Models come from the embedded default cache
($SAU_CACHE); each grid point reloads the target (the pipeline prunes it in place).

`quantized` adds 4-bit durability at the matched points: it reruns, as `sau sweep` cells
(resumable, one file per cell under --sweep-dir), only the grid points that bracket a
crossing, and evaluates each unlearned model also after 4-bit RTN quantization (group
128, sau.lab.quantize) and after NF4 (block 64), with the durability columns of
sau.lab.durable (|dw| / bin percentiles, "survives" shares). The sweep's cells are the
pipeline's runs (same plan, seed and data order), so their full-precision forget ROUGE-L
must equal the `run` rows': `summarize` counts the points where it does not. The 4-bit
metrics are interpolated with the same weight t as the full-precision ones (the two
bracketing points and t come from the full-precision curve), so they describe the model
that matches the retain level. The runs can also be `sau sweep` results.json files (an
lr grid with `--bits` empty, as for the TOFU-scale corpus): the rerun then takes their
corpus and settings. The reading, interpolation and tables: sau.lab.matched_report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sau.lab.durable import QUANTIZERS
from sau.lab.inputs import Inputs
from sau.lab.matched_report import (
    FACTORS,
    METRICS,
    VARIANTS,
    bracket,
    grid_of,
    read_rows,
    summarize,
)
from sau.lab.models import build_default, load_model
from sau.lab.pipeline import PipelineConfig, run_pipeline
from sau.lab.steps import evaluate
from sau.lab.sweep import Settings, Source, run_sweep

LRS = (5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3)
# The per-cell durability columns (sau.lab.durable.durability_stats) a rerun keeps.
DURABILITY = ("moved", "durable_pushed") + tuple(
    c
    for q in QUANTIZERS
    for c in (f"dw_bin_{q}_p10", f"dw_bin_{q}_p50", f"dw_bin_{q}_p90", f"survive_{q}", f"qdiff_{q}")
)


def _done(path: Path) -> set:
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["seed"], r["prune"], r["lr"]) for r in rows if "lr" in r}


def run(args) -> None:
    """Run the pipeline at every grid point not in --out yet; one JSON line per row."""
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    for prune in args.prunes:  # magnitude for every seed first: partial runs stay useful
        for seed in args.seeds:
            art = build_default(args.cache, seed=seed, progress=False)
            retain_model, _ = load_model(art.retain_dir)
            for lr in args.lrs:
                if (seed, prune, lr) in done:
                    continue
                # fresh target: run_pipeline prunes it
                inputs = Inputs.from_default(art, retain_model=retain_model)
                cfg = PipelineConfig(prune=prune, lr=lr, seed=seed, variants=tuple(args.variants))
                t0 = time.perf_counter()
                res = run_pipeline(inputs, cfg, progress=False, references=False, log=_quiet)
                wall = time.perf_counter() - t0
                with out.open("a") as f:
                    for row in res.reference + res.rows:
                        rec = {k: v for k, v in row.items() if _jsonable(v)}
                        rec.update(seed=seed, prune=prune, lr=lr, grid_point_seconds=wall)
                        f.write(json.dumps(rec) + "\n")
                print(f"seed {seed} {prune} lr {lr:g}: {wall:.0f} s", flush=True)


def levels(args) -> None:
    """Evaluate each seed's retain model once: its forget ROUGE-L is the match target."""
    torch.set_num_threads(1)
    with Path(args.out).open("a") as f:
        for seed in args.seeds:
            art = build_default(args.cache, seed=seed, progress=False)
            split = art.dataset.splits()
            model, tok = load_model(art.retain_dir)
            inputs = Inputs(
                model, tok, split["forget"], split["retain"], split["holdout"], split["general"]
            )
            res = evaluate(model, inputs, PipelineConfig(seed=seed), None, False)
            row = {k: v for k, v in res.items() if _jsonable(v)}
            f.write(json.dumps({**row, "variant": "retain model", "seed": seed}) + "\n")


def _quiet(*_args, **_kw) -> None:
    pass


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def _source_of(paths, corpus: str | None) -> tuple[str, dict]:
    """The corpus and sweep settings the rows were made with: from the results.json inputs'
    meta (all must agree), else "default" and the sweep's defaults (the `run` rows).

    Raises SystemExit when the inputs disagree, or disagree with an explicit --corpus: a
    4-bit rerun on another corpus or recipe would not reproduce the grid's models."""
    metas = [json.loads(Path(p).read_text())["meta"] for p in paths if str(p).endswith(".json")]
    if not metas:
        return corpus or "default", {}
    meta = metas[0]
    if any((m["source"], m["settings"]) != (meta["source"], meta["settings"]) for m in metas):
        raise SystemExit("quantized: the sweep results.json inputs differ in source or settings")
    found = meta["source"]["corpus"]
    if found not in ("default", "tofu") or (corpus and corpus != found):
        raise SystemExit(f"quantized: the sweep ran on corpus {found!r}, not {corpus!r}")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["settings"].items()}
    return found, settings


def quantized(args) -> None:
    """Rerun the bracketing grid points as sweep cells with a 4-bit evaluation."""

    torch.set_num_threads(1)
    corpus, settings = _source_of(args.jsonl, args.corpus)
    retain_level, grid, _ = grid_of(read_rows(args.jsonl))
    out = Path(args.out)
    for seed in args.seeds:  # one seed at a time: a partial run still gives whole seeds
        blocks = []
        for (prune, s, variant), pts in sorted(grid.items()):
            lrs = set()
            for f in FACTORS if s == seed else ():
                hit = bracket(pts, f * retain_level[s])
                if hit is not None:
                    lrs.update((pts[hit[0]][0], pts[hit[0] + 1][0]))
            if lrs:
                blocks.append(
                    dict(seed=(seed,), prune=(prune,), variant=(variant,), lr=tuple(sorted(lrs)))
                )
        t0 = time.perf_counter()
        res = run_sweep(
            blocks,
            args.sweep_dir,
            source=Source(corpus=corpus, cache=args.cache),
            settings=Settings(**{**settings, "bits": (4, "nf4")}),
            report=False,
            progress=not args.no_progress,
        )
        keep = (*METRICS, "forget_rouge", "forget_quality", "seconds", "eval_seconds")
        keep += tuple(
            f"q{b}_{m}"
            for b in (4, "nf4")
            for m in ("forget_rouge", "forget_quality", "model_utility")
        )
        keep += DURABILITY
        with out.open("a") as fh:
            for row in res.rows:
                if row["variant"] in ("retain", "target"):
                    continue
                rec = {k: row.get(k) for k in keep if k in row}
                rec.update(variant=row["variant"], seed=seed, prune=row["prune"], lr=row["lr"])
                fh.write(json.dumps(rec) + "\n")
        print(
            f"seed {seed}: {res.ran} cells run, {res.reused} reused, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--prunes", nargs="+", default=["magnitude", "wanda"])
    r.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    r.add_argument("--variants", nargs="+", default=list(VARIANTS))
    r.add_argument("--cache", default=None)
    s = sub.add_parser("summarize")
    s.add_argument("jsonl", nargs="+", help="JSON-lines rows and/or sau sweep results.json")
    lv = sub.add_parser("levels")
    lv.add_argument("--out", required=True)
    lv.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lv.add_argument("--cache", default=None)
    q = sub.add_parser("quantized")
    q.add_argument("jsonl", nargs="+", help="the run and levels rows")
    q.add_argument("--sweep-dir", required=True, help="the sweep's cell directory (resumable)")
    q.add_argument("--out", required=True, help="JSON lines appended per seed")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--cache", default=None)
    q.add_argument(
        "--corpus",
        choices=("default", "tofu"),
        help="the runs' corpus (default: a results.json input's, else default)",
    )
    q.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    {
        "run": run,
        "summarize": lambda a: summarize(a.jsonl),
        "levels": levels,
        "quantized": quantized,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
