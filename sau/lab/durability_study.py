"""Durability study: does the forgetting survive RTN-4 and NF4, per variant and learning rate?

Reads the cells of `sau sweep` runs made with ``--stop-at retain --bits 4 nf4`` and writes
a summary and one plot. Matching: each cell stops at the first epoch end whose forget
ROUGE-L is at or below the retain model's and also evaluates the model of the epoch before
(the ``prev_*`` columns; epoch 0 is the starting model). Every column is interpolated
linearly between those two models to the point where forget ROUGE-L equals the retain
model's, as the fixed-epoch analysis (sau.lab.matched_report) interpolates between two
learning rates: t = (prev - level) / (prev - stop) on the forget ROUGE-L values. So every
cell that reached the level is compared at exactly matched forgetting; recovery there is
the interpolated quantized forget ROUGE-L minus the level.

    python -m sau.lab.durability_study runs/durability-default-magnitude \
        runs/durability-default-wanda --out runs/durability-default

Update size: Δw/bin is |w_after - w_before| over the quantizer's bin width at the starting
weight (sau.lab.durable), over the entries the variant moved; "level changed" is the share
of those whose quantization level differs from the starting weight's.
Recovery is what quantization gives back: forget ROUGE-L after quantization minus before
(positive: the model remembers more once quantized). The paired comparison takes, for
each pruning method, learning rate and seed where both variants reached the retain level,
the variant's recovery and utility minus `masked`'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from sau.lab.matched_report import bracket

VARIANTS = ("dense", "masked", "sau-update", "sau-durable")
QUANTIZERS = (("rtn4", "q4"), ("nf4", "qnf4"))  # (durability suffix, metric prefix)
BASELINE = "masked"
MARK = "<!-- written by python -m sau.lab.durability_study -->"


# Interpolated to the retain level: the metrics, and the durability columns (whose value
# at the starting model, where nothing moved, is 0: no update, no level changed).
METRICS = tuple(
    f"{p}{m}"
    for p in ("", "q4_", "qnf4_")
    for m in ("forget_rouge", "model_utility", "retain_rouge", "mia_auc")
)
UPDATE = tuple(
    key
    for q, _ in QUANTIZERS
    for key in (f"survive_{q}", f"qdiff_{q}", *(f"dw_bin_{q}_p{p}" for p in (10, 50, 90)))
)


def at_retain_level(row: dict) -> dict:
    """`row` with every METRICS and UPDATE column interpolated to the retain level between
    the cell's model (at or below the level) and the epoch before (``prev_*``), plus
    ``epoch`` (the fractional epoch of the crossing), ``t`` and ``matched`` True.

    A cell without ``prev_*`` columns (a sweep made before they existed), that did not
    reach the level, or whose two models do not bracket it (a starting model already at
    the level) is returned unchanged with ``matched`` False.
    """
    level, prev = row.get("retain_forget_rouge"), row.get("prev_forget_rouge")
    if not row.get("reached_retain") or prev is None or level is None:
        return {**row, "matched": False}
    # The fixed-epoch analysis's rule, on two epochs instead of two learning rates.
    hit = bracket([(row["prev_epoch"], {"forget_rouge": prev}), (row["epochs_run"], row)], level)
    if hit is None:  # the starting model was already at the level: nothing brackets it
        return {**row, "matched": False}
    t = hit[1]
    out = {**row, "t": t, "matched": True}
    for key in METRICS + UPDATE:
        a, b = row.get(f"prev_{key}"), row.get(key)
        if a is None and key in UPDATE and row.get("prev_moved") == 0:
            a = 0.0  # the starting model: no update
        out[key] = None if a is None or b is None else a + t * (b - a)
    out["epoch"] = row["prev_epoch"] + t * (row["epochs_run"] - row["prev_epoch"])
    return out


def load_cells(run_dirs) -> list[dict]:
    """The unlearning cells (one dict per cell JSON) of sweep run directories, each
    interpolated to the retain level (`at_retain_level`), with the recovery columns added;
    the dense cells (unpruned) once even if two runs hold them."""
    rows, seen = [], set()
    for run_dir in run_dirs:
        for path in sorted(Path(run_dir, "cells").glob("*.json")):
            row = json.loads(path.read_text())
            if row.get("variant") not in VARIANTS or row["key"] in seen:
                continue
            seen.add(row["key"])
            row = at_retain_level(row)
            for _, prefix in QUANTIZERS:
                if row.get(f"{prefix}_forget_rouge") is not None:
                    row[f"recovery_{prefix}"] = row[f"{prefix}_forget_rouge"] - row["forget_rouge"]
            rows.append(row)
    return rows


def _mean_std(values, fmt: str = ".3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _groups(rows, prune: str) -> dict:
    """(variant, lr) -> cells of that pruning method (dense: the unpruned cells)."""
    out = defaultdict(list)
    for r in rows:
        if r["prune"] in (prune, "none"):
            out[(r["variant"], r["lr"])].append(r)
    return out


METRIC_COLUMNS = (
    ("epochs", "epoch"),
    ("utility", "model_utility"),
    ("forget ROUGE-L", "forget_rouge"),
    ("after RTN-4", "q4_forget_rouge"),
    ("after NF4", "qnf4_forget_rouge"),
    ("recovery RTN-4", "recovery_q4"),
    ("recovery NF4", "recovery_qnf4"),
)
UPDATE_COLUMNS = tuple(
    (f"{name} {col}", f"{key}_{q}")
    for q, name in (("nf4", "NF4"), ("rtn4", "RTN-4"))
    for col, key in (
        ("Δw/bin p10", "dw_bin"),
        ("p50", "dw_bin"),
        ("p90", "dw_bin"),
        ("level changed", "survive"),
    )
)


def table(rows, prune: str, columns) -> str:
    """Markdown: one line per variant and lr, mean ± std over the seeds that reached the
    retain level (n of the seeds run)."""
    head = "| variant | lr | reached | " + " | ".join(c for c, _ in columns) + " |\n"
    head += "|---|---|---|" + "---|" * len(columns) + "\n"
    lines = []
    for (variant, lr), cells in sorted(_groups(rows, prune).items(), key=_order):
        ok = [c for c in cells if c.get("reached_retain")]
        values = [
            _mean_std([_column(c, col, key) for c in ok], ".1f" if key == "epoch" else ".3f")
            for col, key in columns
        ]
        lines.append(f"| {variant} | {lr:g} | {len(ok)}/{len(cells)} | " + " | ".join(values))
    return head + "".join(f"{line} |\n" for line in lines)


def _column(row: dict, col: str, key: str):
    """A cell's value for a column; percentile columns name their percentile."""
    if key.startswith("dw_bin_"):
        pct = "p10" if "p10" in col else "p90" if "p90" in col else "p50"
        return row.get(f"{key}_{pct}")
    return row.get(key)


def _order(item):
    (variant, lr), _ = item
    return VARIANTS.index(variant), lr


def paired(rows, variant: str, prune: str) -> list[dict]:
    """Per (lr, seed) where `variant` and masked both reached the retain level: the
    differences variant - masked in utility and in recovery after RTN-4 and NF4."""
    by = {(r["variant"], r["lr"], r["seed"]): r for r in rows if r["prune"] == prune}
    out = []
    for (v, lr, seed), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        base = by.get((BASELINE, lr, seed))
        if v != variant or base is None:
            continue
        if not (r.get("reached_retain") and base.get("reached_retain")):
            continue
        diff = {"lr": lr, "seed": seed}
        for key in ("model_utility", "recovery_q4", "recovery_qnf4"):
            if r.get(key) is not None and base.get(key) is not None:
                diff[key] = r[key] - base[key]
        out.append(diff)
    return out


def paired_table(rows, prunes) -> str:
    """Markdown: per pruning method and variant, mean ± std of the paired differences and
    the number of pairs where the variant recovers less than masked."""
    head = (
        "| pruning | variant | pairs | utility - masked | recovery RTN-4 - masked | "
        "lower RTN-4 recovery | recovery NF4 - masked | lower NF4 recovery |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for prune in prunes:
        for variant in ("sau-update", "sau-durable"):
            pairs = paired(rows, variant, prune)
            if not pairs:
                continue
            cols = [_mean_std([p.get("model_utility") for p in pairs])]
            for key in ("recovery_q4", "recovery_qnf4"):
                vals = [p[key] for p in pairs if key in p]
                cols += [_mean_std(vals), f"{sum(v < 0 for v in vals)}/{len(vals)}"]
            lines.append(f"| {prune} | {variant} | {len(pairs)} | " + " | ".join(cols) + " |")
    return head + "".join(f"{line}\n" for line in lines)


def plot(rows, prunes, path: Path) -> Path | None:
    """Recovery after RTN-4 and NF4 against lr at the retain level, one line per variant
    (mean over the seeds that reached it; bars: min to max), one panel per method x
    quantizer; the models' dtype in the title."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(
        len(prunes), 2, figsize=(10, 3.6 * len(prunes)), squeeze=False, sharey=True
    )
    for i, prune in enumerate(prunes):
        groups = _groups(rows, prune)
        for j, (name, prefix) in enumerate((("RTN-4", "q4"), ("NF4", "qnf4"))):
            ax = axes[i][j]
            for variant in VARIANTS:
                _plot_variant(ax, groups, variant, f"recovery_{prefix}")
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.set(xscale="log", xlabel="learning rate", title=f"{prune} 50%, {name}")
            ax.set_ylabel("forget ROUGE-L recovered")
    axes[0][0].legend(fontsize=8)
    dtype = rows[0].get("dtype") or "float32"
    fig.suptitle(f"Recovery at the retain model's forget ROUGE-L ({dtype} models)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_variant(ax, groups: dict, variant: str, key: str) -> None:
    points = []
    for (v, lr), cells in sorted(groups.items()):
        vals = [c[key] for c in cells if v == variant and c.get("reached_retain") and key in c]
        if vals:
            points.append((lr, statistics.mean(vals), min(vals), max(vals)))
    if points:
        lrs, mean, lo, hi = zip(*points)
        err = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]
        ax.errorbar(lrs, mean, yerr=err, marker="o", capsize=3, label=variant)


def summary(rows) -> str:
    """The whole Markdown summary: per method the metric and update-size tables, then the
    paired comparison against masked."""
    prunes = sorted({r["prune"] for r in rows} - {"none"})
    reached = [r for r in rows if r.get("reached_retain")]
    matched = sum(r["matched"] for r in reached)
    dtype = rows[0].get("dtype") or "float32"
    parts = [
        f"Models in {dtype}. "
        f"{len(reached)} of {len(rows)} cells reached the retain level; {matched} of them "
        "are interpolated to it exactly (the rest are at their stopping epoch: "
        "sweeps without the `prev_*` columns).\n\n"
    ]
    for prune in prunes:
        parts.append(f"### {prune} 50% (dense: the unpruned model)\n\n")
        parts.append(table(rows, prune, METRIC_COLUMNS) + "\n")
        parts.append(table(rows, prune, UPDATE_COLUMNS) + "\n")
    parts.append("### Paired against masked (same lr and seed, both at the retain level)\n\n")
    parts.append(paired_table(rows, prunes))
    return "".join(parts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="sau sweep output directories")
    ap.add_argument("--out", type=Path, required=True, help="directory for summary.md, plot")
    args = ap.parse_args(argv)
    rows = load_cells(args.runs)
    if not rows:
        raise SystemExit(f"no unlearning cells of {', '.join(VARIANTS)} under {args.runs}")
    dtypes = sorted({r.get("dtype") or "float32" for r in rows})
    if len(dtypes) > 1:  # a table line averages over seeds, never over dtypes
        raise SystemExit(f"the runs mix dtypes {dtypes}: summarize each dtype on its own")
    args.out.mkdir(parents=True, exist_ok=True)
    target, figure = args.out / "summary.md", args.out / "durability-vs-lr.png"
    ours = target.exists() and target.read_text().startswith(MARK)
    for path in (target, figure):  # the pair is written together: ours iff summary.md is
        if path.exists() and not ours:
            raise SystemExit(f"{path} exists and was not written by this tool; pick another --out")
    target.write_text(MARK + "\n\n" + summary(rows))
    prunes = sorted({r["prune"] for r in rows} - {"none"})
    plot(rows, prunes, figure)
    print(f"{len(rows)} cells -> {target}, {figure}")


if __name__ == "__main__":
    main()
