"""Planning speed on the CPU: `plan_selection` against `torch.kthvalue` over the same survivors.

    python benchmarks/plan_speed.py                       # TinyLlama widths, 16 layers
    python benchmarks/plan_speed.py --layers 2 --hidden 512 --intermediate 1408  # seconds
    python benchmarks/plan_speed.py --label before --repeats 1 --warmup 0

Problem: the 7 decoder Linear weights of `--layers` Llama layers (default: hidden 2048,
intermediate 5632, 32 heads, 4 KV heads: 112 weights, 704M entries), each drawn from
N(0, 0.02) and magnitude-pruned by half (the smallest |w| zeroed); saliency is a random
non-negative float32 tensor of each weight's shape (uniform on [0, 1)).

Timed, median of `--repeats` rounds after `--warmup` rounds, the variants interleaved
within each round:
  plan       plan_selection(named_params, saliency, k=0.3), default options (the PyTorch
             backend on the CPU: selection, importances, amplification, entry codes)
  kthvalue   per layer: the survivor scores scores[weight != 0], then torch.kthvalue at
             the rank of the r-th largest, r = ceil(k * |S|) (the baseline)
  partition  the same with numpy: np.compress of the survivors, np.partition at that rank
  masks      per layer: the boolean survivor mask weight != 0 alone (a floor)
Each layer's plan tau is checked against the kthvalue baseline's value.

The JSON at --out holds one entry per --label under "runs" (a rerun replaces its label),
each with its environment (benchmarks/env_info.py), problem, raw times and the load
average before and after (other work on a shared CPU slows torch's threaded operations
far more than numpy's single-threaded ones).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import llama_layer_shapes  # noqa: E402
from benchmarks.env_info import environment  # noqa: E402
from sau.plan import plan_selection  # noqa: E402
from sau_kernels._common import num_selected  # noqa: E402

K = 0.3


def build(shapes, seed: int = 0) -> tuple[list, dict]:
    """(named params, saliency) of the benchmark problem (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    named, saliency = [], {}
    for i, shape in enumerate(shapes):
        w = torch.randn(shape, generator=gen) * 0.02
        magnitude = w.abs().view(-1).numpy()
        half = magnitude.size // 2
        cut = np.partition(magnitude, half - 1)[half - 1]  # the half-th smallest |w|
        w[w.abs() <= float(cut)] = 0
        name = f"layers.{i // 7}.linear{i % 7}.weight"
        named.append((name, torch.nn.Parameter(w)))
        saliency[name] = torch.rand(shape, generator=gen)
    return named, saliency


def run_plan(named, saliency) -> list[float]:
    """plan_selection with default options; returns each layer's tau."""
    plan = plan_selection(named, saliency, k=K)
    return [float(layer.selection.threshold) for layer in plan.values()]


def run_kthvalue(named, saliency) -> list[float]:
    """Per layer: torch.kthvalue of scores[weight != 0] at the r-th largest."""
    taus = []
    for name, param in named:
        values = saliency[name][param.detach() != 0]
        r = num_selected(K, values.numel())
        taus.append(float(torch.kthvalue(values, values.numel() - r + 1).values))
    return taus


def run_partition(named, saliency) -> list[float]:
    """Per layer: np.partition of the compressed survivor scores at the r-th largest."""
    taus = []
    for name, param in named:
        values = np.compress(param.detach().numpy().reshape(-1) != 0, saliency[name].numpy())
        rank = values.size - num_selected(K, values.size)
        taus.append(float(np.partition(values, rank)[rank]))
    return taus


def run_masks(named, saliency) -> None:
    """Per layer: the boolean survivor mask alone."""
    for _, param in named:
        torch.ne(param.detach(), 0)


VARIANTS = {
    "plan": run_plan,
    "kthvalue": run_kthvalue,
    "partition": run_partition,
    "masks": run_masks,
}


def measure(named, saliency, variants, repeats: int, warmup: int) -> dict:
    """{variant: [seconds per round]}, rounds interleaved; checks plan tau == kthvalue's."""
    times = {v: [] for v in variants}
    taus = {}
    for round_ in range(warmup + repeats):
        for v in variants:
            start = time.perf_counter()
            out = VARIANTS[v](named, saliency)
            elapsed = time.perf_counter() - start
            taus[v] = out
            if round_ >= warmup:
                times[v].append(elapsed)
            print(f"  round {round_} {v:10s} {elapsed:8.2f} s", flush=True)
    if "plan" in taus and "kthvalue" in taus and taus["plan"] != taus["kthvalue"]:
        raise SystemExit("plan_selection's tau differs from torch.kthvalue's")
    return times


def write(out: Path, label: str, record: dict) -> None:
    """Add or replace the run `label` in the JSON at `out`."""
    data = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    data["runs"][label] = record
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


def table(medians: dict) -> str:
    """Medians in seconds and as a multiple of the kthvalue baseline."""
    base = medians.get("kthvalue")
    lines = [f"{'variant':10s} {'median s':>10s} {'x kthvalue':>11s}"]
    for v, t in medians.items():
        ratio = f"{t / base:11.2f}" if base else f"{'-':>11s}"
        lines.append(f"{v:10s} {t:10.3f} {ratio}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--label", default="current")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/plan-speed.json"))
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    kv_hidden = args.hidden // args.heads * args.kv_heads
    shapes = llama_layer_shapes(args.hidden, args.intermediate, kv_hidden, args.layers)
    load_before = os.getloadavg()  # the CPU is shared: record how busy it was
    start = time.perf_counter()
    named, saliency = build(shapes)
    print(f"built {len(shapes)} weights in {time.perf_counter() - start:.1f} s", flush=True)
    times = measure(named, saliency, variants, args.repeats, args.warmup)
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    problem = {
        "layers": args.layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "kv_hidden": kv_hidden,
        "weights": len(shapes),
        "entries": sum(a * b for a, b in shapes),
        "sparsity": 0.5,
        "k": K,
        "threads": torch.get_num_threads(),
    }
    record = {
        "environment": environment(),
        "date": time.strftime("%Y-%m-%d"),
        "problem": problem,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seconds": times,
        "median_s": medians,
        "loadavg_before_after": [load_before, os.getloadavg()],
    }
    write(Path(args.out), args.label, record)
    print(table(medians))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
