"""Selection options at matched forgetting (issue 15): run an lr grid, then interpolate.

Each variant is run at every learning rate of a grid; for each seed and pruning method the
learning rate at which its forget ROUGE-L equals f x the retain model's (f = 0.9, 1.0,
1.1) is interpolated linearly in log(lr) between the two grid points that bracket it
(the first crossing from the smallest lr), and utility, log10 forget quality and MIA AUC
are interpolated at the same point. Comparing variants there asks which one keeps the
most utility for the same amount of forgetting, instead of at the same learning rate.

    python benchmarks/matched_forgetting.py run --out runs/mf.jsonl [--seeds 0 1 2] ...
    python benchmarks/matched_forgetting.py summarize runs/mf.jsonl > table.md

`run` appends one JSON line per (seed, prune, lr, variant) and skips combinations already
in the file, so an interrupted run resumes. Models come from the embedded default cache
($SAU_CACHE); each grid point reloads the target (the pipeline prunes it in place).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

LRS = (5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3)
VARIANTS = ("masked", "sau-update", "sau-contrast", "sau-saliency-amp", "sau-global", "sau-mass")
FACTORS = (0.9, 1.0, 1.1)
METRICS = ("model_utility", "log10_fq", "mia_auc", "retain_rouge")


def _done(path: Path) -> set:
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["seed"], r["prune"], r["lr"]) for r in rows if "lr" in r}


def run(args) -> None:
    import torch

    from sau.models import build_default, load_model
    from sau.pipeline import Inputs, PipelineConfig, run_pipeline

    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    for prune in args.prunes:  # magnitude for every seed first: partial runs stay useful
        for seed in args.seeds:
            art = build_default(args.cache, seed=seed, progress=False)
            split = art.dataset.splits()
            retain_model, _ = load_model(art.retain_dir)
            for lr in args.lrs:
                if (seed, prune, lr) in done:
                    continue
                model, tok = load_model(art.target_dir)  # fresh: run_pipeline prunes it
                inputs = Inputs(
                    model,
                    tok,
                    split["forget"],
                    split["retain"],
                    split["holdout"],
                    split["general"],
                    retain_model,
                    source=str(art.target_dir),
                )
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
    import torch

    from sau.models import build_default, load_model
    from sau.pipeline import Inputs, PipelineConfig, _eval

    torch.set_num_threads(1)
    with Path(args.out).open("a") as f:
        for seed in args.seeds:
            art = build_default(args.cache, seed=seed, progress=False)
            split = art.dataset.splits()
            model, tok = load_model(art.retain_dir)
            inputs = Inputs(
                model, tok, split["forget"], split["retain"], split["holdout"], split["general"]
            )
            res = _eval(model, tok, inputs, PipelineConfig(seed=seed), None, False)
            row = {k: v for k, v in res.items() if _jsonable(v)}
            f.write(json.dumps({**row, "variant": "retain model", "seed": seed}) + "\n")


def _quiet(*_args, **_kw) -> None:
    pass


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def _log10_fq(row: dict) -> float | None:
    fq = row.get("forget_quality")
    return None if fq is None else math.log10(max(fq, 1e-300))


def crossing(points: list[tuple[float, dict]], target: float) -> dict | None:
    """Metrics interpolated where forget ROUGE-L first falls to `target` (None: never).

    points: (lr, row) sorted by lr; interpolation is linear in log(lr).
    """
    for (lr0, a), (lr1, b) in zip(points, points[1:]):
        f0, f1 = a["forget_rouge"], b["forget_rouge"]
        if f0 >= target >= f1 and f0 != f1:
            t = (f0 - target) / (f0 - f1)
            out = {"lr": math.exp(math.log(lr0) + t * (math.log(lr1) - math.log(lr0)))}
            for m in METRICS:
                x0 = _log10_fq(a) if m == "log10_fq" else a.get(m)
                x1 = _log10_fq(b) if m == "log10_fq" else b.get(m)
                out[m] = None if x0 is None or x1 is None else x0 + t * (x1 - x0)
            return out
    return None


def analyse(rows: list[dict]) -> dict:
    """{(prune, factor, variant): {seed: interpolated metrics or None}}, retain levels."""
    retain_level = {}  # per seed: the retain model is not pruned
    for r in rows:
        if r["variant"] == "retain model":
            retain_level.setdefault(r["seed"], r["forget_rouge"])
    grid: dict = {}
    for r in rows:
        if "lr" in r:
            grid.setdefault((r["prune"], r["seed"], r["variant"]), []).append((r["lr"], r))
    table: dict = {}
    for (prune, seed, variant), pts in grid.items():
        pts.sort(key=lambda p: p[0])
        level = retain_level[seed]
        for f in FACTORS:
            table.setdefault((prune, f, variant), {})[seed] = crossing(pts, f * level)
    return {"table": table, "retain_level": retain_level}


def _ms(xs: list[float], fmt: str = ".3f") -> str:
    """mean ± sample std (one value: the value; none: -)."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt)}"


def summarize(args) -> None:
    rows = [
        json.loads(line)
        for path in args.jsonl
        for line in Path(path).read_text().splitlines()
        if line.strip()
    ]
    res = analyse(rows)
    table = res["table"]
    prunes = sorted({k[0] for k in table})
    variants = [v for v in VARIANTS if any(k[2] == v for k in table)]
    print(
        "| pruning | forget ROUGE-L target | variant | seeds reached | lr at match | "
        "model utility | log10 forget quality | MIA AUC | utility - masked, per seed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for prune in prunes:
        for f in FACTORS:
            base = table.get((prune, f, "masked"), {})
            for v in variants:
                per_seed = table.get((prune, f, v), {})
                hit = {s: m for s, m in per_seed.items() if m is not None}
                cols = [
                    _ms([m[key] for m in hit.values() if m[key] is not None], fmt)
                    for key, fmt in (
                        ("lr", ".2e"),
                        ("model_utility", ".3f"),
                        ("log10_fq", ".2f"),
                        ("mia_auc", ".3f"),
                    )
                ]
                diffs = []
                for s in sorted(per_seed):
                    if v == "masked":
                        break
                    a, b = per_seed[s], base.get(s)
                    diffs.append(
                        f"{a['model_utility'] - b['model_utility']:+.3f}" if a and b else "n/a"
                    )
                print(
                    f"| {prune} | {f:.1f}x | {v} | {len(hit)}/{len(per_seed)} | "
                    + " | ".join(cols)
                    + f" | {', '.join(diffs) or '-'} |"
                )
    levels = res["retain_level"]
    print(
        "\nretain model forget ROUGE-L (seed, prune): "
        + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(levels.items()))
    )
    walls = {}
    for r in [r for r in rows if "lr" in r]:
        walls[(r["seed"], r["prune"], r["lr"])] = r.get("grid_point_seconds", 0.0)
    print(f"grid points: {len(walls)}, wall time {sum(walls.values()) / 60:.1f} min")


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
    s.add_argument("jsonl", nargs="+")
    lv = sub.add_parser("levels")
    lv.add_argument("--out", required=True)
    lv.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lv.add_argument("--cache", default=None)
    args = p.parse_args()
    {"run": run, "summarize": summarize, "levels": levels}[args.cmd](args)


if __name__ == "__main__":
    main()
