"""Numbers the sweep report is built from: durability columns, seed aggregates, Pareto
fronts and which front dominates which. Pure Python on the cell rows (no plotting)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from sau.lab.variants import DTYPES, VARIANTS
from sau.names import ROUNDINGS, STATE_BITS

__all__ = [
    "FLAG_SHARE",
    "aggregate",
    "compare_fronts",
    "derive",
    "in_slice",
    "log10_fq",
    "main_setting",
    "pareto_front",
    "precision_label",
    "precision_rank",
    "same_precision",
]

# A row's forgetting "does not survive 4-bit" when 4-bit quantization gives back at least
# this share of the forget ROUGE-L that unlearning removed (and unlearning removed >= 0.05).
FLAG_SHARE = 0.5
MIN_REMOVED = 0.05
GROUP = (
    "variant",
    "prune",
    "sparsity",
    "method",
    "lr",
    "k",
    "alpha",
    "stop_at",
    "dtype",
    "rounding",
    "state_bits",
)
# A row's precision settings (sau.lab.sweep.grid.Cell), and what a row without them ran.
PRECISION = {"dtype": "float32", "rounding": None, "state_bits": None}
_ORDERS = {"dtype": DTYPES, "rounding": ROUNDINGS, "state_bits": STATE_BITS}


def _plan_axes(variant: str) -> tuple[bool, bool]:
    v = VARIANTS.get(variant)
    return v.uses_plan_axes if v is not None else (False, False)


def main_setting(rows) -> dict:
    """The pruning method, k and alpha most cells use: the slice the degradation curve,
    the Pareto fronts and the durability table show (k/alpha only of variants whose k
    and alpha come from the grid's axes); likewise the dtype, then among the rows of that
    dtype the rounding and state_bits of those that have one (`same_precision`; ties go
    to the default: float32, kahan, 32)."""

    def mode(col, default, which):
        c = Counter(r[col] for r in rows if r.get(col) not in (None, "none") and which(r))
        return c.most_common(1)[0][0] if c else default

    def precision_mode(col, which):
        c = Counter(r.get(col, PRECISION[col]) for r in rows if which(r))
        c.pop(None, None)
        return max(c, key=lambda v: (c[v], -_rank(col, v)), default=PRECISION[col])

    dtype = precision_mode("dtype", lambda r: True)

    def at_dtype(r):
        return r.get("dtype", PRECISION["dtype"]) == dtype

    return {
        "prune": mode("prune", "none", lambda r: True),
        "k": mode("k", 0.3, lambda r: _plan_axes(r["variant"])[0]),
        "alpha": mode("alpha", 0.1, lambda r: _plan_axes(r["variant"])[1]),
        "dtype": dtype,
        "rounding": precision_mode("rounding", at_dtype),
        "state_bits": precision_mode("state_bits", at_dtype),
    }


def same_precision(row: dict, main: dict) -> bool:
    """`row` ran at the main setting's dtype, and at its rounding and state_bits where the
    row has one (a torch AdamW or starting-model row has none)."""
    return _precision(row)[0] == main["dtype"] and all(
        row.get(col) in (None, main[col]) for col in ("rounding", "state_bits")
    )


def _precision(row: dict) -> tuple:
    return tuple(row.get(col, default) for col, default in PRECISION.items())


def _rank(col: str, value) -> int:
    order = _ORDERS[col]
    return -1 if value is None else order.index(value) if value in order else len(order)


def precision_rank(row: dict) -> tuple:
    """A sort key of a row's (dtype, rounding, state_bits): each in the order DTYPES,
    ROUNDINGS and STATE_BITS list them (the defaults first), None before any value."""
    return tuple(_rank(col, v) for col, v in zip(PRECISION, _precision(row)))


def precision_label(row: dict) -> str:
    """A row's dtype, rounding and moments in a few words: "float32", "bfloat16, kahan",
    "bfloat16, stochastic, 8-bit state" (the defaults' parts left out)."""
    dtype, rounding, bits = _precision(row)
    parts = [dtype] + [rounding] * bool(rounding) + [f"{bits}-bit state"] * (bits == 8)
    return ", ".join(parts)


def in_slice(row: dict, main: dict) -> bool:
    """An unlearned row of the main slice: fixed epochs, the main pruning method (or
    none), and the main k / alpha where the variant takes them from the axes."""
    if row["variant"] in ("retain", "target") or row["stop_at"] != "none":
        return False
    use_k, use_alpha = _plan_axes(row["variant"])
    return (
        row["prune"] in (main["prune"], "none")
        and (not use_k or row["k"] == main["k"])
        and (not use_alpha or row["alpha"] == main["alpha"])
    )


def log10_fq(value) -> float | None:
    """log10 of a forget-quality p-value (floored at 1e-300); None stays None."""
    if value is None:
        return None
    return math.log10(max(float(value), 1e-300))


def _start_of(row: dict, by_key: dict) -> dict | None:
    """The starting model's row of an unlearned row (target at the same pruning)."""
    if row["variant"] in ("retain", "target"):
        return None
    sparsity, prune = row["sparsity"], row["prune"]
    if row["variant"] == "dense":
        sparsity, prune = 0.0, "none"
    return by_key.get((row["seed"], "target", prune, sparsity, _precision(row)[0]))


def derive(rows: list[dict], bits=(8, 4)) -> list[dict]:
    """Rows with log10 forget quality, recovery (after quantization minus before) of
    forget ROUGE-L, log10 forget quality and utility per width, and the 4-bit flag."""
    by_key = {
        (r["seed"], r["variant"], r["prune"], r["sparsity"], _precision(r)[0]): r
        for r in rows
        if r["variant"] == "target"
    }
    out = []
    for r in rows:
        r = dict(r)
        r["log10_fq"] = log10_fq(r.get("forget_quality"))
        for b in bits:
            r[f"q{b}_log10_fq"] = log10_fq(r.get(f"q{b}_forget_quality"))
            for m in ("forget_rouge", "log10_fq", "model_utility"):
                after, before = r.get(f"q{b}_{m}"), r.get(m)
                ok = after is not None and before is not None
                r[f"q{b}_recovery_{m}"] = after - before if ok else None
        start = _start_of(r, by_key)
        r["start_forget_rouge"] = start["forget_rouge"] if start else None
        flag = None
        if start is not None and r.get("q4_forget_rouge") is not None:
            removed = start["forget_rouge"] - r["forget_rouge"]
            back = r["q4_forget_rouge"] - r["forget_rouge"]
            flag = bool(removed >= MIN_REMOVED and back >= FLAG_SHARE * removed)
        r["q4_forgetting_lost"] = flag
        out.append(r)
    return out


def _mean_std(values):
    vals = [float(v) for v in values if v is not None and not isinstance(v, bool)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sample std over seeds of every numeric column, per cell-without-seed.

    Returns dicts with the GROUP keys, n (seeds), and `<col>` / `<col>_std` for each
    numeric column; boolean columns become counts (`<col>_count`)."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in GROUP)].append(r)
    out = []
    for key, members in groups.items():
        agg = dict(zip(GROUP, key))
        agg["n"] = len(members)
        cols = {c for r in members for c, v in r.items() if c not in GROUP}
        for col in sorted(cols):
            values = [r.get(col) for r in members]
            if all(isinstance(v, bool) or v is None for v in values):
                if any(isinstance(v, bool) for v in values):
                    agg[f"{col}_count"] = sum(1 for v in values if v is True)
                continue
            if all(isinstance(v, (int, float)) or v is None for v in values) and col != "seed":
                agg[col], agg[f"{col}_std"] = _mean_std(values)
        out.append(agg)
    return out


def pareto_front(points: list[tuple]) -> list[tuple]:
    """The non-dominated (utility, log10 FQ, ...) points (both higher is better), sorted
    by utility ascending."""
    pts = [p for p in points if p[0] is not None and p[1] is not None]
    front = [
        p
        for p in pts
        if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for q in pts)
    ]
    return sorted(set(front), key=lambda p: p[0])


def _covers(a: list[tuple], b: list[tuple]) -> bool:
    """Every point of b is weakly dominated by a point of a."""
    return all(any(q[0] >= p[0] and q[1] >= p[1] for q in a) for p in b)


def _best_at(front: list[tuple], u: float) -> float:
    """The best log10 FQ a front reaches with utility >= u (-inf if none)."""
    vals = [p[1] for p in front if p[0] >= u]
    return max(vals) if vals else -math.inf


def compare_fronts(name_a: str, a: list[tuple], name_b: str, b: list[tuple]) -> str:
    """One sentence: which front dominates, or at which utilities the leader changes."""
    if not a or not b:
        return "-"
    ca, cb = _covers(a, b), _covers(b, a)
    if ca and cb:
        return "same front"
    if ca:
        return f"{name_a} dominates"
    if cb:
        return f"{name_b} dominates"
    levels = sorted({p[0] for p in a} | {p[0] for p in b})
    spans, last = [], None
    for u in levels:
        fa, fb = _best_at(a, u), _best_at(b, u)
        if fa == fb:
            continue
        lead = name_a if fa > fb else name_b
        if lead != last:
            spans.append((u, lead))
            last = lead
    parts = [f"{lead} leads at utility >= {u:.2f}" for u, lead in spans]
    return "cross: " + "; ".join(parts)
