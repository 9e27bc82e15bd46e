"""Reports of a pipeline run: a text table, results.json, report.md and PNG plots.

Plots use matplotlib's Agg backend (no display needed). Everything is written into the
directory it is given; the commands hand it a temporary directory and rename it into
place afterwards, so a report is never half-written where the user looks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["COLUMNS", "format_table", "plot_layers", "plot_tradeoff", "write_report"]

# (results.json key, table header, format)
COLUMNS = (
    ("variant", "variant", "{}"),
    ("forget_quality", "forget quality", "{:.3g}"),
    ("model_utility", "utility", "{:.3f}"),
    ("forget_rouge", "forget ROUGE-L", "{:.3f}"),
    ("retain_rouge", "retain ROUGE-L", "{:.3f}"),
    ("mia_auc", "MIA AUC", "{:.3f}"),
    ("sparsity_kept", "sparsity kept", "{:.4f}"),
    ("seconds", "seconds", "{:.1f}"),
)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(rows: list[dict], *, markdown: bool = False) -> str:
    """Rows (dicts with the results.json keys) as a fixed-width or Markdown table."""
    heads = [h for _, h, _ in COLUMNS]
    cells = [[_cell(r.get(k), f) for k, _, f in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)
    ]
    fmt = lambda c: "  ".join(  # noqa: E731 - a one-line row formatter
        (v.ljust(w) if i == 0 else v.rjust(w)) for i, (v, w) in enumerate(zip(c, widths))
    )
    return "\n".join([fmt(heads), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells])


def _json_ready(value):
    # numpy scalars / arrays and Paths are not JSON; NaN/inf become null.
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "tolist"):
        return _json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _pyplot():
    """matplotlib.pyplot on the Agg backend.

    Imported here, not at the top: importing this module must neither pay for matplotlib
    nor switch the backend of a program that only formats tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(rows: list[dict], reference: list[dict], path: Path) -> Path:
    """Scatter of forget quality (log scale) against model utility, one point per row."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for group, marker in ((rows, "o"), (reference, "s")):
        for r in group:
            fq = r.get("forget_quality")
            if fq is None:
                continue
            y = max(fq, 1e-30)  # a p-value of 0 still gets a point on a log axis
            ax.scatter(r["model_utility"], y, marker=marker, s=50)
            ax.annotate(
                r["variant"],
                (r["model_utility"], y),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality, KS p-value (higher is better)")
    ax.set_title("Forget quality vs utility (circles: variants, squares: starting models)")
    ax.title.set_fontsize(9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layers(plan_stats: list[dict], path: Path) -> Path:
    """Per-layer bars from the SAU plan: pruned share of saliency I_P/(I_P+I_S) and w."""
    plt = _pyplot()
    names = [s["name"].replace("model.layers.", "L").replace(".weight", "") for s in plan_stats]
    share = [s["I_P"] / (s["I_P"] + s["I_S"]) if s["I_P"] + s["I_S"] else 0.0 for s in plan_stats]
    w = [s["w"] for s in plan_stats]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(6.4, 0.32 * len(names)), 5.6), sharex=True)
    a.bar(range(len(names)), share, color="tab:red")
    a.set_ylabel("I_P / (I_P + I_S)")
    a.set_title("Saliency the pruned weights carried, per layer")
    b.bar(range(len(names)), w, color="tab:blue")
    b.set_ylabel("amplification w")
    b.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results, out_dir: Path, *, title: str = "SAU demo") -> list[Path]:
    """Write results.json, report.md, tradeoff.png and (with a plan) layers.png.

    results: `sau.lab.pipeline.Results`. Returns the paths written.
    """
    out_dir = Path(out_dir)
    payload = {
        "config": results.config,
        "rows": results.rows,
        "reference": results.reference,
        "plan_totals": results.plan_totals,
        "plan_layers": results.plan_stats,
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps(_json_ready(payload), indent=2) + "\n", encoding="utf-8")
    written = [path, plot_tradeoff(results.rows, results.reference, out_dir / "tradeoff.png")]
    if results.plan_stats:
        written.append(plot_layers(results.plan_stats, out_dir / "layers.png"))
    lines = _summary_lines(results, title) + _recovery_lines(results.rows)
    lines += _selection_lines(results.plan_totals)
    lines += ["", "![forget quality vs utility](tradeoff.png)"]
    if results.plan_stats:
        lines += ["", "![per-layer selection](layers.png)"]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written.append(path)
    return written


def _summary_lines(results, title: str) -> list[str]:
    # Title, settings, the variant table with its legend, the starting models.
    cfg = results.config
    lines = [
        f"# {title}",
        "",
        f"Method {cfg['method']}, pruning {cfg['prune']} at sparsity {cfg['sparsity']} "
        f"(measured {cfg.get('measured_sparsity', float('nan')):.4f}), k={cfg['k']}, "
        f"alpha={cfg['alpha']}, lr={cfg['lr']}, epochs={cfg['epochs']}, seed={cfg['seed']}.",
        "",
        "## Variants",
        "",
        format_table(results.rows, markdown=True),
        "",
        "Forget quality: KS-test p-value of forget truth ratios against the retain model "
        "(higher = closer to never having seen the forget set). Sparsity kept: fraction of "
        "entries pruned in the starting model that are still exactly zero (for "
        "unlearn-then-prune: how much of that mask the later pruning reproduces). Seconds: "
        "saliency (SAU rows) + unlearning (+ pruning), without evaluation.",
    ]
    if results.reference:
        lines += ["", "## Starting models", "", format_table(results.reference, markdown=True)]
    return lines


def _recovery_lines(rows: list[dict]) -> list[str]:
    # Whether pruning the dense-unlearned model brought forgotten answers back.
    utp = next((r for r in rows if r["variant"] == "unlearn-then-prune"), None)
    if utp is None:
        return []
    before, after = utp.get("forget_rouge_before_prune"), utp["forget_rouge"]
    back = after > before + 0.02 if before is not None else False
    return [
        "",
        "## Does pruning bring forgotten answers back?",
        "",
        f"Forget ROUGE-L of the dense-unlearned model: {_cell(before, '{:.3f}')}; after "
        f"pruning it: {_cell(after, '{:.3f}')}. "
        + (
            "Yes: pruning after unlearning recovers part of the forgotten answers."
            if back
            else "No measurable recovery in this run (threshold +0.02)."
        ),
    ]


def _selection_lines(totals: dict) -> list[str]:
    if not totals:
        return []
    return [
        "",
        "## SAU selection (per layer: layers.png)",
        "",
        f"Selected {totals.get('n_selected')} of {totals.get('numel')} entries; "
        f"I_P={totals.get('I_P', 0):.4g}, I_S={totals.get('I_S', 0):.4g}, "
        f"I_G={totals.get('I_G', 0):.4g}.",
    ]
