"""Matched-forgetting analysis: read the lr-grid rows, interpolate each
variant's metrics where its forget ROUGE-L crosses f x the retain model's, print tables.

The runners live in sau.lab.matched_forgetting (`run`, `levels`, `quantized`); its
`summarize` command calls `summarize` here. Pure Python: no torch import, so the tables
can be rebuilt anywhere from the committed rows.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

VARIANTS = ("masked", "sau-update", "sau-contrast", "sau-saliency-amp", "sau-global", "sau-mass")
FACTORS = (0.9, 1.0, 1.1)
METRICS = ("model_utility", "log10_fq", "mia_auc", "retain_rouge")
Q4_METRICS = ("q4_forget_rouge", "q4_model_utility", "q4_log10_fq")


def _log10_fq(row: dict, prefix: str = "") -> float | None:
    fq = row.get(f"{prefix}forget_quality")
    return None if fq is None else math.log10(max(fq, 1e-300))


def _metric(row: dict | None, m: str) -> float | None:
    if row is None:
        return None
    if m.endswith("log10_fq"):
        return _log10_fq(row, m[: -len("log10_fq")])
    return row.get(m)


def bracket(points: list[tuple[float, dict]], target: float) -> tuple[int, float] | None:
    """(i, t): forget ROUGE-L first falls to `target` between points i and i + 1, at
    weight t in [0, 1] (linear in the ROUGE values); None if it never does.

    points: (lr, row) sorted by lr.
    """
    for i, ((_, a), (_, b)) in enumerate(zip(points, points[1:])):
        f0, f1 = a["forget_rouge"], b["forget_rouge"]
        if f0 >= target >= f1 and f0 != f1:
            return i, (f0 - target) / (f0 - f1)
    return None


def crossing(
    points: list[tuple[float, dict]], target: float, quantized: dict | None = None
) -> dict | None:
    """Metrics interpolated where forget ROUGE-L first falls to `target` (None: never).

    points: (lr, row) sorted by lr; interpolation is linear in log(lr).
    quantized: lr -> that grid point's row with q4_ metrics (the `quantized` rows); the
        q4_ metrics are interpolated with the same weight, None where a point lacks them.
    """
    hit = bracket(points, target)
    if hit is None:
        return None
    i, t = hit
    (lr0, a), (lr1, b) = points[i], points[i + 1]
    out = {"lr": math.exp(math.log(lr0) + t * (math.log(lr1) - math.log(lr0)))}
    for m in METRICS:
        x0, x1 = _metric(a, m), _metric(b, m)
        out[m] = None if x0 is None or x1 is None else x0 + t * (x1 - x0)
    quantized = quantized or {}
    for m in Q4_METRICS:
        x0, x1 = _metric(quantized.get(lr0), m), _metric(quantized.get(lr1), m)
        out[m] = None if x0 is None or x1 is None else x0 + t * (x1 - x0)
    if out["q4_forget_rouge"] is not None:  # the full-precision value here is the target
        out["q4_recovery"] = out["q4_forget_rouge"] - target
    if out["q4_model_utility"] is not None and out["model_utility"] is not None:
        out["q4_utility_change"] = out["q4_model_utility"] - out["model_utility"]
    return out


def grid_of(rows: list[dict]) -> tuple[dict, dict, dict]:
    """Retain level per seed; (prune, seed, variant) -> sorted (lr, row) of the `run`
    rows; (prune, seed, variant) -> {lr: row} of the `quantized` rows."""
    retain_level = {}  # per seed: the retain model is not pruned
    for r in rows:
        if r["variant"] == "retain model":
            retain_level.setdefault(r["seed"], r["forget_rouge"])
    grid: dict = {}
    quantized: dict = {}
    for r in rows:
        if r.get("lr") is None:  # the retain model's level rows
            continue
        key = (r["prune"], r["seed"], r["variant"])
        if "q4_forget_rouge" in r:
            quantized.setdefault(key, {})[r["lr"]] = r
        else:
            grid.setdefault(key, []).append((r["lr"], r))
    for pts in grid.values():
        pts.sort(key=lambda p: p[0])
    return retain_level, grid, quantized


def analyse(rows: list[dict]) -> dict:
    """{(prune, factor, variant): {seed: interpolated metrics or None}}, retain levels,
    and the quantized rows whose full-precision forget ROUGE-L differs from the run's."""
    retain_level, grid, quantized = grid_of(rows)
    table: dict = {}
    for (prune, seed, variant), pts in grid.items():
        level = retain_level[seed]
        q = quantized.get((prune, seed, variant))
        for f in FACTORS:
            table.setdefault((prune, f, variant), {})[seed] = crossing(pts, f * level, q)
    mismatch, checked = [], 0
    for key, by_lr in quantized.items():
        runs = dict(grid.get(key, []))
        for lr, q in by_lr.items():
            if lr in runs:
                checked += 1
                if abs(runs[lr]["forget_rouge"] - q["forget_rouge"]) > 1e-9:
                    mismatch.append((*key, lr))
    return {
        "table": table,
        "retain_level": retain_level,
        "q4_checked": checked,
        "q4_mismatch": mismatch,
    }


def _ms(xs: list[float], fmt: str = ".3f") -> str:
    """mean ± sample std (one value: the value; none: -)."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], fmt)
    spread = format(statistics.stdev(xs), fmt.lstrip("+"))  # a spread has no sign
    return f"{format(statistics.mean(xs), fmt)} ± {spread}"


def _from_sweep(path: Path) -> list[dict]:
    """A `sau sweep` results.json as this script's rows: the retain row as the level, each
    fixed-epoch unlearned cell as a `run` row and, with 4-bit metrics, a `quantized` row."""
    rows = []
    for r in json.loads(path.read_text())["rows"]:
        if r["variant"] == "retain":
            rows.append({**r, "variant": "retain model"})
        elif r["variant"] != "target" and r["stop_at"] == "none" and r.get("lr"):
            rows.append({k: v for k, v in r.items() if not k.startswith("q")})
            if r.get("q4_forget_rouge") is not None:
                rows.append(r)
    return rows


def read_rows(paths) -> list[dict]:
    """Rows of JSON-lines files (run, levels, quantized) and sweep results.json files."""
    rows = []
    for path in map(Path, paths):
        if path.suffix == ".json":
            rows += _from_sweep(path)
        else:
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def summarize(paths) -> None:
    """Print the matched-forgetting tables (markdown) for run, levels, quantized and sweep
    results.json rows."""
    rows = read_rows(paths)
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
    _print_q4(res, prunes, variants)
    levels = res["retain_level"]
    print(
        "\nretain model forget ROUGE-L (seed, prune): "
        + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(levels.items()))
    )
    walls = {}
    for r in rows:
        if "grid_point_seconds" in r:  # the `run` rows (sweep rows time each cell instead)
            walls[(r["seed"], r["prune"], r["lr"])] = r["grid_point_seconds"]
    if walls:
        print(f"grid points: {len(walls)}, wall time {sum(walls.values()) / 60:.1f} min")
    cells = [r for r in rows if r.get("lr") and "eval_seconds" in r and "q4_forget_rouge" not in r]
    if cells:  # sweep rows without a 4-bit evaluation (their own results.json)
        minutes = sum(r["seconds"] + r["eval_seconds"] for r in cells) / 60
        print(f"sweep cells: {len(cells)} unlearning runs, {minutes:.1f} min of summed cell time")


def q4_paired(table: dict, prune: str, f: float, variant: str) -> list[float]:
    """Per seed (sorted), the variant's 4-bit utility minus masked's at target f, for the
    seeds where both crossings have 4-bit metrics."""
    base = table.get((prune, f, "masked"), {})
    out = []
    for s, m in sorted(table.get((prune, f, variant), {}).items()):
        b = base.get(s)
        if m and b and m["q4_model_utility"] is not None and b["q4_model_utility"] is not None:
            out.append(m["q4_model_utility"] - b["q4_model_utility"])
    return out


def _q4_vs_masked(table: dict, prune: str, f: float, variant: str) -> str:
    if variant == "masked":
        return "-"
    diffs = q4_paired(table, prune, f, variant)
    ahead = sum(d > 0 for d in diffs)
    return f"{_ms(diffs, '+.3f')} ({ahead}/{len(diffs)})" if diffs else "-"


def _print_q4(res: dict, prunes: list, variants: list) -> None:
    """The 4-bit table at the matched points (only where `quantized` rows exist)."""
    table = res["table"]
    if not res["q4_checked"]:
        return
    print(
        "\n4-bit RTN (group 128) at the matched points: forget ROUGE-L after 4-bit, its "
        "recovery (after minus the full-precision value, which is the target), utility "
        "after 4-bit and its change, log10 forget quality after 4-bit; mean ± std over the "
        "seeds with 4-bit runs; vs masked: 4-bit utility minus masked's at the same "
        "target, paired by seed (seeds ahead / seeds paired)."
    )
    print(
        "\n| pruning | forget ROUGE-L target | variant | seeds | 4-bit forget ROUGE-L | "
        "recovery | 4-bit utility | utility change | 4-bit log10 FQ | max recovery | "
        "vs masked (4-bit) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for prune in prunes:
        for f in FACTORS:
            for v in variants:
                hit = [m for m in table.get((prune, f, v), {}).values() if m]
                hit = [m for m in hit if m.get("q4_recovery") is not None]
                if not hit:
                    continue
                cols = [
                    _ms([m[key] for m in hit if m[key] is not None], fmt)
                    for key, fmt in (
                        ("q4_forget_rouge", ".3f"),
                        ("q4_recovery", "+.3f"),
                        ("q4_model_utility", ".3f"),
                        ("q4_utility_change", "+.3f"),
                        ("q4_log10_fq", ".2f"),
                    )
                ]
                worst = max(m["q4_recovery"] for m in hit)
                print(
                    f"| {prune} | {f:.1f}x | {v} | {len(hit)} | "
                    + " | ".join(cols)
                    + f" | {worst:+.3f} | {_q4_vs_masked(table, prune, f, v)} |"
                )
    bad = res["q4_mismatch"]
    print(
        f"\n4-bit grid points: {res['q4_checked']}; full-precision forget ROUGE-L equal to "
        f"the run's at {res['q4_checked'] - len(bad)}" + (f"; differs at {bad}" if bad else "")
    )
