"""The sweep's outputs: results.csv, results.json, report.md (tables) and the PNG plots.

All are rebuilt from the cell rows each time and written atomically into the sweep's
directory (`sau.lab.outdir.SweepDir`: listed in its marker, written through a temporary
file created exclusively, then renamed).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from sau.lab.sweep.analysis import (
    FLAG_SHARE,
    GROUP,
    MIN_REMOVED,
    aggregate,
    compare_fronts,
    derive,
    in_slice,
    main_setting,
    pareto_front,
    precision_label,
    precision_rank,
    same_precision,
)
from sau.lab.sweep.grid import number_label
from sau.lab.sweep.plots import (
    ORDER,
    plot_degradation,
    plot_durability,
    plot_heatmaps,
    plot_matched,
    plot_pareto,
)

__all__ = ["OUTPUTS", "write_outputs"]

PLOTS = ("degradation.png", "pareto.png", "heatmaps.png", "matched.png", "durability.png")
OUTPUTS = ("results.json", "results.csv", "report.md", *PLOTS)  # every file write_outputs writes
LEAD = (GROUP[0], "seed", *GROUP[1:])  # a cell's settings: its group's, and its seed
SKIP_CSV = ("forget_truth_ratio",)


def _fmt(v, spec="{:.3f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return spec.format(v)
    return str(v)


def _num(v) -> str:
    """A setting's number, exactly (`number_label`): two cells never print alike."""
    return "-" if v is None else number_label(v)


def _pm(r, col, spec="{:.3f}") -> str:
    mean, std = r.get(col), r.get(f"{col}_std")
    if mean is None:
        return "-"
    return _fmt(mean, spec) + (f" ± {spec.format(std)}" if std else "")


def _table(heads, lines) -> list[str]:
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    return out + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]


def _csv(rows) -> str:
    cols = list(LEAD) + sorted({c for r in rows for c in r} - set(LEAD) - set(SKIP_CSV))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                c: (";".join(f"{x:.4f}" for x in r[c]) if isinstance(r.get(c), list) else r.get(c))
                for c in cols
            }
        )
    return buf.getvalue()


def _sort(agg):
    rank = {v: i for i, v in enumerate(("retain", "target") + ORDER)}
    return sorted(
        agg,
        key=lambda r: (
            r["stop_at"],
            r["sparsity"],
            r["prune"],
            rank.get(r["variant"], 99),
            r["variant"],
            r["lr"] or 0,
            r["k"] or 0,
            r["alpha"] or 0,
            precision_rank(r),
        ),
    )


def _qname(b) -> str:
    """A quantized evaluation's name in the tables: "4-bit" (RTN) or "NF4"."""
    return "NF4" if b == "nf4" else f"{b}-bit"


def _summary(agg, bits) -> list[str]:
    # A precision column only when some cell is not plain float32.
    mixed = any(precision_label(r) != "float32" for r in agg)
    heads = [
        "variant",
        "prune",
        "sparsity",
        "lr",
        "k",
        "alpha",
        "stop",
        *["precision"] * mixed,
        "seeds",
        "log10 FQ",
        "utility",
        "forget ROUGE-L",
        "MIA AUC",
    ]
    lost_col = 4 in bits  # the 4-bit flag exists only with a 4-bit evaluation
    heads += [f"{_qname(b)} forget ROUGE-L" for b in bits] + ["4-bit lost"] * lost_col
    lines = []
    for r in _sort(agg):
        line = [
            r["variant"],
            r["prune"],
            _num(r["sparsity"]),
            _num(r["lr"]),
            _num(r["k"]),
            _num(r["alpha"]),
            r["stop_at"],
            *[precision_label(r)] * mixed,
            r["n"],
            _pm(r, "log10_fq", "{:.2f}"),
            _pm(r, "model_utility"),
            _pm(r, "forget_rouge"),
            _pm(r, "mia_auc"),
        ]
        line += [_pm(r, f"q{b}_forget_rouge") for b in bits]
        lost = r.get("q4_forgetting_lost_count")
        if lost_col:
            line.append(f"**{lost}/{r['n']}**" if lost else "-" if lost is None else "0")
        lines.append(line)
    return _table(heads, lines)


def _dominance(agg, main) -> list[str]:
    runs = [r for r in agg if in_slice(r, main)]
    if len({r["lr"] for r in runs}) < 2:
        return ["(needs at least two learning rates)"]
    lines = []
    for s in sorted({r["sparsity"] for r in runs if r["variant"] != "dense"}):
        fronts = {}
        for v in sorted({r["variant"] for r in runs}):
            pts = [
                (r["model_utility"], r["log10_fq"])
                for r in runs
                if r["variant"] == v and (r["sparsity"] == s or v == "dense")
            ]
            fronts[v] = pareto_front(pts)
        names = sorted(fronts)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                lines.append([_num(s), a, b, compare_fronts(a, fronts[a], b, fronts[b])])
    legend = [
        "",
        "Fronts: per variant, the non-dominated (utility, log10 forget quality) points over "
        "the learning rates (seed means). 'X dominates': every point of the other front is "
        "matched or beaten by one of X's. 'X leads at utility >= u': among the runs that "
        "keep at least utility u, X reaches the higher forget quality.",
    ]
    return _table(["sparsity", "A", "B", "fronts (log10 FQ vs utility over lr)"], lines) + legend


def _matched(agg, bits) -> list[str]:
    rows = [r for r in _sort(agg) if r["stop_at"] == "retain" and r["variant"] != "retain"]
    if not rows:
        return []
    heads = [
        "variant",
        "prune",
        "sparsity",
        "lr",
        "epochs",
        "reached",
        "utility",
        "forget ROUGE-L",
        "log10 FQ",
        "MIA AUC",
    ] + ["4-bit forget ROUGE-L"] * (4 in bits)
    lines = [
        [
            r["variant"],
            r["prune"],
            _num(r["sparsity"]),
            _num(r["lr"]),
            _pm(r, "epochs_run", "{:.1f}"),
            f"{r.get('reached_retain_count', 0)}/{r['n']}",
            _pm(r, "model_utility"),
            _pm(r, "forget_rouge"),
            _pm(r, "log10_fq", "{:.2f}"),
            _pm(r, "mia_auc"),
        ]
        + [_pm(r, "q4_forget_rouge")] * (4 in bits)
        for r in rows
        if r["variant"] != "target"
    ]
    return [
        "## Matched forgetting (--stop-at retain)",
        "",
        "Each run stops after the first epoch whose greedy forget ROUGE-L is at or below "
        "the retain model's; utility is then compared at (about) equal forgetting.",
        "",
        *_table(heads, lines),
        "",
        "![matched forgetting](matched.png)",
        "",
    ]


def _durability(agg, bits, main) -> list[str]:
    heads = ["variant", "prune", "sparsity", "lr", "forget ROUGE-L"]
    for b in bits:
        q = _qname(b)
        heads += [q, f"{q} recovery", f"{q} Δlog10 FQ", f"{q} Δutility"]
    lines = []
    for r in _sort(agg):
        if not (in_slice(r, main) or r["variant"] in ("retain", "target")):
            continue
        line = [
            r["variant"],
            r["prune"],
            _num(r["sparsity"]),
            _num(r["lr"]),
            _pm(r, "forget_rouge"),
        ]
        for b in bits:
            line += [
                _pm(r, f"q{b}_forget_rouge"),
                _pm(r, f"q{b}_recovery_forget_rouge"),
                _pm(r, f"q{b}_recovery_log10_fq", "{:.2f}"),
                _pm(r, f"q{b}_recovery_model_utility"),
            ]
        lines.append(line)
    return _table(heads, lines)


def write_outputs(rows: list[dict], store, meta: dict) -> list[Path]:
    """Write results.json, results.csv, report.md and the plots (OUTPUTS) into the sweep's
    directory.

    rows: the cell rows (one per cell, all seeds); store: the sweep's
    `sau.lab.outdir.SweepDir`; meta: sweep.json's content. Returns the paths written."""
    bits = tuple(meta["settings"]["bits"])
    rows = derive(rows, bits)
    agg = aggregate(rows)
    main = main_setting(rows)
    payload = {"meta": meta, "rows": rows, "aggregate": agg}
    store.write_text("results.json", json.dumps(payload, indent=1, default=str) + "\n")
    store.write_text("results.csv", _csv(rows))
    # Plots and the tables after "All cells" compare runs of one precision: the main one.
    rows_at, agg_at = ([r for r in x if same_precision(r, main)] for x in (rows, agg))
    made = _write_plots(rows_at, agg_at, main, bits, store)
    lines = _report(meta, agg, agg_at, main, bits, made)
    store.write_text("report.md", "\n".join(lines))
    names = ["results.json", "results.csv", *made, "report.md"]
    return [store.out / name for name in names]


def _write_plots(rows, agg, main, bits, store) -> list[str]:
    """Draw the plots that have data into the sweep's directory; the names of those made."""
    plots = {
        "degradation.png": lambda fh: plot_degradation(agg, main, fh),
        "pareto.png": lambda fh: plot_pareto(agg, main, fh),
        "heatmaps.png": lambda fh: plot_heatmaps(rows, fh),
        "matched.png": lambda fh: plot_matched(agg, fh),
        "durability.png": lambda fh: plot_durability(agg, bits, main, fh),
    }
    return [
        name
        for name, fn in plots.items()
        if store.write(name, lambda fh, fn=fn: fn(fh) is not None)
    ]


def _report(meta: dict, agg, agg_at, main, bits, made: list) -> list[str]:
    """The lines of report.md: settings, every cell (`agg`), then one section per
    plot/table over the cells at the main precision (`agg_at`)."""
    s = meta["settings"]
    mixed = len(agg_at) < len(agg)
    lines = [
        "# SAU sweep",
        "",
        f"Source: {meta['source']}. Epochs {s['epochs']} (stop-at runs: at most "
        f"{s['max_epochs']}), batch {s['batch_size']}, "
        + (
            f"quantization {', '.join(_qname(b) for b in bits)} (RTN group {s['group_size']}, "
            "NF4 block 64)"
            if bits
            else "no quantized evaluation"
        )
        + ". Mean ± sample std over seeds. Slices in the "
        f"plots: pruning {main['prune']}, k {main['k']}, alpha {main['alpha']}"
        + (f", precision {precision_label(main)}" if mixed else "")
        + ".",
        "",
        *(
            [f"**Partial: {meta['missing']} cells of the grid have not run yet.**", ""]
            if meta.get("missing")
            else []
        ),
        "## All cells",
        "",
        *_summary(agg, bits),
        "",
    ]
    if 4 in bits:
        lines += [
            f"4-bit lost: seeds in which 4-bit quantization gave back at least "
            f"{FLAG_SHARE:.0%} of the forget ROUGE-L that unlearning removed (when it "
            f"removed >= {MIN_REMOVED}).",
            "",
        ]
    if "degradation.png" in made:
        lines += ["## Degradation over sparsity", "", "![degradation](degradation.png)", ""]
    if "pareto.png" in made:
        lines += ["## Pareto fronts", "", "![pareto](pareto.png)", "", *_dominance(agg_at, main)]
        lines += [""]
    if "heatmaps.png" in made:
        lines += ["## k x alpha sensitivity", "", "![heatmaps](heatmaps.png)", ""]
    lines += _matched(agg_at, bits)
    if bits:
        lines += _durability_section(agg_at, bits, main, "durability.png" in made)
    return lines


def _durability_section(agg, bits, main, plotted: bool) -> list[str]:
    lines = [
        "## Durability under weight-only quantization",
        "",
        "Recovery = after quantization minus before (forget ROUGE-L: positive means "
        "forgotten answers came back). Starting models are included: their rows show "
        "what quantization alone does.",
        "",
        *_durability(agg, bits, main),
        "",
    ]
    return lines + (["![durability](durability.png)", ""] if plotted else [])
