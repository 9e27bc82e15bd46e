"""The sweep's figures (matplotlib, Agg backend): degradation curve, Pareto fronts,
k x alpha heatmaps, matched-forgetting bars and 4-bit durability bars.

Every function takes aggregated rows (`sau.lab.sweep.analysis.aggregate`) and a path or
an open binary file, writes one PNG and returns the path (or file), or None when the rows
hold nothing to draw (then nothing is written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sau.lab.sweep.analysis import aggregate, in_slice, pareto_front
from sau.lab.sweep.grid import number_label

__all__ = ["plot_degradation", "plot_durability", "plot_heatmaps", "plot_matched", "plot_pareto"]

ORDER = (
    "dense",
    "masked",
    "sau-grad",
    "sau-update",
    "unlearn-then-prune",
    "mask-only",
    "redistribute-only",
)


def _plt():
    # Imported on first plot, not at the top: importing the sweep must neither pay for
    # matplotlib nor switch the backend of the program that imports it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8})
    return plt


def _variants(rows) -> list[str]:
    names = {r["variant"] for r in rows if r["variant"] not in ("retain", "target")}
    return [v for v in ORDER if v in names] + sorted(names - set(ORDER))


def _legend_below(fig, ax) -> None:
    """One legend for the figure, under the panels, so it never hides a point.

    Every label of every panel is listed once (`ax`'s first): a variant that appears only
    in some panels (the ablation rows at two sparsities) still gets its entry."""
    found: dict = {}
    for a in [ax, *(a for a in fig.axes if a is not ax)]:
        for handle, label in zip(*a.get_legend_handles_labels()):
            found.setdefault(label, handle)
    handles, labels = list(found.values()), list(found)
    ncol = min(5, len(labels))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
    fig._sau_legend_rows = -(-len(labels) // max(1, ncol))


def _save(fig, plt, path):
    rows = getattr(fig, "_sau_legend_rows", 0)
    fig.tight_layout(rect=(0, min(0.3, 0.25 * rows / fig.get_figheight()), 1, 1))
    fig.savefig(path, dpi=110, format="png")  # a path or an open binary file
    plt.close(fig)
    return path


def plot_degradation(agg, main: dict, path: Path) -> Path | None:
    """log10 forget quality and forget ROUGE-L against sparsity, one line per variant
    (mean, error bars = std over seeds), one row per learning rate; dashed: retain model,
    grey: the pruned target before unlearning; dense is flat (it never sees the pruning)."""
    runs = [r for r in agg if in_slice(r, main)]
    lrs = sorted({r["lr"] for r in runs})
    if not runs or len({r["sparsity"] for r in runs}) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(lrs), 2, figsize=(9.6, 3.2 * len(lrs)), squeeze=False)
    retain = next((r for r in agg if r["variant"] == "retain"), None)
    targets = sorted(
        (r for r in agg if r["variant"] == "target" and r["prune"] in (main["prune"], "none")),
        key=lambda r: r["sparsity"],
    )
    xs_all = sorted({r["sparsity"] for r in runs})
    for row, lr in enumerate(lrs):
        for col, (metric, label) in enumerate(
            (("log10_fq", "log10 forget quality (0 best)"), ("forget_rouge", "forget ROUGE-L"))
        ):
            ax = axes[row][col]
            for v in _variants(runs):
                pts = sorted(
                    (r for r in runs if r["variant"] == v and r["lr"] == lr),
                    key=lambda r: r["sparsity"],
                )
                if not pts:
                    continue
                if v == "dense" and len(pts) == 1:
                    pts = [dict(pts[0], sparsity=x) for x in xs_all]
                ax.errorbar(
                    [p["sparsity"] for p in pts],
                    [p.get(metric) for p in pts],
                    yerr=[p.get(f"{metric}_std") or 0 for p in pts],
                    marker="o",
                    ms=4,
                    capsize=3,
                    label=v,
                    ls=":" if v == "dense" else "-",
                )
            if targets:
                ax.plot(
                    [t["sparsity"] for t in targets],
                    [t.get(metric) for t in targets],
                    color="grey",
                    marker="s",
                    ms=3,
                    label="target (start)",
                )
            if retain is not None and retain.get(metric) is not None:
                ax.axhline(retain[metric], color="black", ls="--", lw=1, label="retain model")
            ax.set_xlabel(f"sparsity ({main['prune']})")
            ax.set_ylabel(label)
            ax.set_title(f"{label} vs sparsity, lr {number_label(lr)}")
            ax.grid(True, alpha=0.3)
    _legend_below(fig, axes[0][1])
    return _save(fig, plt, path)


def plot_pareto(agg, main: dict, path: Path) -> Path | None:
    """Forget quality against utility over the learning rates: one panel per sparsity,
    the points of each variant (labelled with lr) and its non-dominated front."""
    runs = [r for r in agg if in_slice(r, main)]
    sparsities = sorted({r["sparsity"] for r in runs if r["variant"] != "dense"})
    if not runs or len({r["lr"] for r in runs}) < 2 or not sparsities:
        return None
    plt = _plt()
    ncol = min(3, len(sparsities))
    nrow = -(-len(sparsities) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.8 * nrow), squeeze=False)
    colors = {v: f"C{i}" for i, v in enumerate(_variants(runs))}
    for i, s in enumerate(sparsities):
        ax = axes[i // ncol][i % ncol]
        for v in _variants(runs):
            pts = [
                (r["model_utility"], r["log10_fq"], r["lr"])
                for r in runs
                if r["variant"] == v and (r["sparsity"] == s or v == "dense")
            ]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colors[v], s=14, alpha=0.6)
            front = pareto_front(pts)
            ax.plot(
                [p[0] for p in front],
                [p[1] for p in front],
                color=colors[v],
                label=v,
                marker="o",
                ms=5,
            )
            for p in pts:
                ax.annotate(
                    number_label(p[2]),
                    (p[0], p[1]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=7,
                    color=colors[v],
                )
        ax.set_title(f"sparsity {number_label(s)}: Pareto fronts over lr")
        ax.set_xlabel("model utility (higher is better)")
        ax.set_ylabel("log10 forget quality (0 best)")
        ax.grid(True, alpha=0.3)
    for j in range(len(sparsities), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    _legend_below(fig, axes[0][0])
    return _save(fig, plt, path)


def _common_seed_panels(rows) -> dict:
    """(variant, prune, sparsity, lr) -> seed means of its (k, alpha) cells, over only the
    seeds every cell of the panel has (so no cell mixes in seeds its neighbours lack)."""
    by_panel: dict = {}
    for r in rows:
        if r["k"] is not None and r["alpha"] is not None and r["stop_at"] == "none":
            key = (r["variant"], r["prune"], r["sparsity"], r["lr"])
            by_panel.setdefault(key, []).append(r)
    panels = {}
    for key, rs in by_panel.items():
        cells: dict = {}
        for r in rs:
            cells.setdefault((r["k"], r["alpha"]), set()).add(r["seed"])
        if len({k for k, _ in cells}) < 2 or len({a for _, a in cells}) < 2:
            continue
        seeds = set.intersection(*cells.values())
        if seeds:
            panels[key] = (sorted(seeds), aggregate([r for r in rs if r["seed"] in seeds]))
    return panels


def plot_heatmaps(rows, path: Path) -> Path | None:
    """k x alpha heatmaps of log10 forget quality and utility, one row per (variant,
    sparsity, lr) that varies both k and alpha. rows: per-seed rows (`derive`); each
    panel averages the seeds all of its cells have (named in the title)."""
    panels = _common_seed_panels(rows)
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 2, figsize=(9.0, 3.4 * len(panels)), squeeze=False)
    for row, ((v, prune, s, lr), (seeds, rs)) in enumerate(sorted(panels.items())):
        ks, alphas = sorted({r["k"] for r in rs}), sorted({r["alpha"] for r in rs})
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds"
        for col, (metric, label, cmap) in enumerate(
            (("log10_fq", "log10 FQ", "viridis"), ("model_utility", "utility", "magma"))
        ):
            grid = np.full((len(ks), len(alphas)), np.nan)
            for r in rs:
                if r.get(metric) is not None:
                    grid[ks.index(r["k"]), alphas.index(r["alpha"])] = r[metric]
            ax = axes[row][col]
            im = ax.imshow(grid, cmap=cmap, aspect="auto", origin="lower")
            for (i, j), val in np.ndenumerate(grid):
                if not np.isnan(val):
                    ax.text(
                        j,
                        i,
                        f"{val:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if val < np.nanmean(grid) else "black",
                    )
            ax.set_xticks(range(len(alphas)), [number_label(a) for a in alphas])
            ax.set_yticks(range(len(ks)), [number_label(k) for k in ks])
            ax.set_xlabel("alpha")
            ax.set_ylabel("k")
            title = f"{v}, {prune} {number_label(s)}, lr {number_label(lr)} ({seed_text}): {label}"
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax)
    return _save(fig, plt, path)


def plot_matched(agg, path: Path) -> Path | None:
    """Utility of each variant when stopped at the retain model's forget ROUGE-L, grouped
    by sparsity; each bar is labelled with the epochs it needed (* = never reached)."""
    rows = [r for r in agg if r["stop_at"] == "retain" and r["variant"] not in ("retain", "target")]
    if not rows:
        return None
    plt = _plt()
    groups = sorted({(r["prune"], r["sparsity"]) for r in rows if r["variant"] != "dense"}) or [
        ("none", 0.0)
    ]
    variants = _variants(rows)
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(groups) * len(variants) / 2), 4.2))
    for j, v in enumerate(variants):
        for i, (prune, s) in enumerate(groups):
            r = next(
                (
                    r
                    for r in rows
                    if r["variant"] == v
                    and (v == "dense" or (r["prune"], r["sparsity"]) == (prune, s))
                ),
                None,
            )
            if r is None:
                continue
            x = i + (j - (len(variants) - 1) / 2) * width
            ax.bar(
                x,
                r["model_utility"],
                width,
                yerr=r.get("model_utility_std") or 0,
                color=f"C{j}",
                label=v if i == 0 else None,
                capsize=2,
            )
            reached = r.get("reached_retain_count", 0) == r["n"]
            ax.annotate(  # above the error bar, so the bar never crosses the label
                f"{r.get('epochs_run', 0):.1f}{'' if reached else '*'}",
                (x, r["model_utility"] + (r.get("model_utility_std") or 0)),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=8,
            )
    ax.set_xticks(range(len(groups)), [f"{p} {number_label(s)}" for p, s in groups])
    ax.set_xlabel("pruning, sparsity")
    ax.set_ylabel("model utility at matched forgetting")
    ax.set_title("Utility when stopped at the retain model's forget ROUGE-L (label: epochs)")
    _legend_below(fig, ax)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, plt, path)


def plot_durability(agg, bits, main: dict, path: Path) -> Path | None:
    """Forget ROUGE-L after quantization (y) against before (x), one point per cell of
    the main slice (mean over seeds), one panel per width; above the diagonal means
    quantization brought forgotten answers back. Squares: the starting models."""
    rows = [
        r
        for r in agg
        if (in_slice(r, main) or r["variant"] in ("retain", "target"))
        and r.get("forget_rouge") is not None
    ]
    if not rows or not bits:  # bits=(): no quantized evaluation, nothing to draw
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(bits), figsize=(4.4 * len(bits), 4.4), squeeze=False)
    colors = {v: f"C{i}" for i, v in enumerate(_variants(rows))}
    for ax, b in zip(axes[0], bits):
        for v in ("retain", "target", *_variants(rows)):
            pts = [r for r in rows if r["variant"] == v and r.get(f"q{b}_forget_rouge") is not None]
            if not pts:
                continue
            ref = v in ("retain", "target")
            ax.scatter(
                [r["forget_rouge"] for r in pts],
                [r[f"q{b}_forget_rouge"] for r in pts],
                marker="s" if ref else "o",
                s=30 if ref else 18,
                label=v,
                color="grey" if v == "target" else "black" if ref else colors[v],
            )
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("forget ROUGE-L, full precision")
        name = "NF4" if b == "nf4" else f"{b}-bit RTN"
        ax.set_ylabel(f"forget ROUGE-L after {name}")
        ax.set_title(f"{name}: above the diagonal = recovery")
        ax.grid(True, alpha=0.3)
    _legend_below(fig, axes[0][0])
    return _save(fig, plt, path)
