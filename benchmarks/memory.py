"""Peak memory of one real unlearning step, per configuration, each in a fresh process.

    python benchmarks/memory.py                 # CPU table (`make bench-memory`, < 10 min)
    python benchmarks/memory.py --configs adamw-ckpt \
        --out benchmarks/results/memory-cpu-ckpt.json   # the opt-in CPU row, its own file
    python benchmarks/memory.py --tiny          # the same code path in seconds
    python benchmarks/memory.py --gpu --out F   # CUDA: Llama-3.1-8B dimensions, bf16
    python benchmarks/memory.py --gpu --tiny --out F   # the GPU code path at a tiny size
    python benchmarks/memory.py --shape llama-3.1-8b --dtype bfloat16 --layers 2 4
        # CPU: Llama-3.1-8B widths in bf16 at 2 and 4 layers, extrapolated to 32, with a
        # bytes model beside every row (benchmarks/results/memory-8b-cpu.json, < 15 min)

Configurations (benchmarks/memory_child.py runs one; GradDiff loss, forget and retain
batches of 1 x T tokens, computed from ONE forward over the rows [forget; retain] in every
configuration (sau.unlearn.objectives.objective_loss with joint=True: with two forwards
each weight is used twice and autograd buffers all its partial gradients until the end
of backward, so in_backward would save nothing), decoder Linear weights trainable, pruned
50%; a step row measures one steady-state step after a warm-up step that created the
optimizer state):
  adamw            torch.optim.AdamW on the decoder Linear weights (for-loop on the CPU,
                   fused on CUDA)
  masked           the same AdamW, pruned entries re-zeroed after each step (bool masks)
  sau              SAUAdamW, k = 0.3
  sau-in-backward  SAUAdamW(in_backward=True), k = 0.3
  saliency-fp32 / saliency-bf16   compute_saliency alone, float32 / bfloat16 accumulator
  adamw-ckpt / sau-in-backward-ckpt   the same with activation checkpointing per layer
  e2e-fp32 / e2e-bf16 (GPU mode)  saliency (2 batches) + plan + 2 in-backward SAU steps
The CPU mode measures peak RSS above the RSS after building the model (built once by a
`prepare` child and read back by each row's child; the rows run two at a time within the
free memory: benchmarks/memory_cache.py, benchmarks/memory_sched.py); the GPU mode
measures torch.cuda.max_memory_allocated at 2 and 4 decoder layers and extrapolates to
the full depth: peak(L) = peak(4) + (L - 4) * (peak(4) - peak(2)) / 2; the e2e rows are
measured at the full depth (32 layers) at T = 512. The --shape mode measures SHAPE_CONFIGS
(below) the CPU way at two depths, one child per row and depth, two at a time within the
free memory, and extrapolates the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import memory_sched as sched  # noqa: E402
from benchmarks.env_info import environment  # noqa: E402
from benchmarks.memory_cache import MODEL_JSON  # noqa: E402

CHILD = ROOT / "benchmarks" / "memory_child.py"
STEP_CONFIGS = ("adamw", "masked", "sau", "sau-in-backward", "saliency-fp32", "saliency-bf16")
# With activation checkpointing: the forward's activations otherwise set the peak of the
# in-backward step (measured), so the gradient buffer it removes never shows.
CKPT_CONFIGS = ("adamw-ckpt", "sau-in-backward-ckpt")
# Not in the default CPU table, only with --configs: the longest child (~200 s of the
# 10-minute budget on the loaded 2-core VM) and its peak is torch AdamW's (11.61 vs 11.60
# GiB, measured in one run: checkpointing frees activations that are already gone when
# AdamW peaks, at the end of backward with every gradient alive).
CPU_OPT_IN = ("adamw-ckpt",)
E2E_CONFIGS = ("e2e-fp32", "e2e-bf16")
# ~1B-shaped (TinyLlama-1.1B's widths, 16 layers, vocab 32000): 0.84B params, 0.70B of
# them in decoder Linear weights. fp32 torch AdamW needs ~13 GiB here; the 22-layer
# original (~16 GiB) does not leave room on a 24 GiB machine other processes share.
CPU_DIMS = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000)
CPU_LAYERS = 16
# Llama-3.1-8B: hidden 4096, 32 heads, 8 KV heads, intermediate 14336, vocab 128256, 32 layers.
GPU_DIMS = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
GPU_LAYERS = 32
TINY_DIMS = dict(hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=256)

# --shape: real model widths in bf16 on the CPU, each row at two depths and extrapolated
# to the full depth (peak(L) = peak(4) + (L - 4) * (peak(4) - peak(2)) / 2), one row at a
# time (benchmarks/results/memory-8b-cpu.json; docs/benchmarks.md has the table).
SHAPES = {"llama-3.1-8b": (GPU_DIMS, GPU_LAYERS)}
SHAPE_CONFIGS = (
    "adamw-fp32",  # dense AdamW with float32 moments (SAUAdamW without a plan)
    "adamw-fp32-ckpt",
    "masked-fp32",  # the same, pruned entries re-zeroed after each step (bool masks)
    "masked-fp32-ckpt",
    "sau",  # SAUAdamW, k = 0.3, kahan rounding, float32 moments
    "sau-ckpt",
    "sau-compact",
    "sau-compact-ckpt",
    "sau-in-backward",
    "sau-in-backward-ckpt",
    "sau-compact-8bit-ckpt",  # state_bits=8
    "sau-in-backward-8bit-ckpt",
    "sau-in-backward-8bit-sr-ckpt",  # stochastic rounding: no compensation byte
    "saliency-bf16",
    "saliency-bf16-bounded",  # max_accumulator_bytes = one decoder layer's accumulators
    "plan",  # sau.plan_selection, k = 0.3, from a bf16 saliency
)
# Only with --configs: torch.optim.AdamW as it is on bf16 parameters (bf16 moments).
SHAPE_OPT_IN = ("adamw",)
SHAPE_TOKENS = 512  # per batch: forget and retain are 1 x 512 each, one forward of 2 x 512


def layer_params(dims: dict) -> int:
    """Entries of one decoder layer's Linear weights (q, k, v, o, gate, up, down)."""
    h, i = dims["hidden"], dims["intermediate"]
    kv = h // dims["heads"] * dims["kv_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i


def shape_specs(args) -> list[dict]:
    """The child specs of a --shape run (--tiny: the same rows at the tiny widths)."""
    dims, full = SHAPES[args.shape]
    tokens = args.tokens or SHAPE_TOKENS
    if args.tiny:
        dims, full, tokens = TINY_DIMS, 4, 16
    base = dict(dims=dims, dtype=args.dtype, device="cpu", steps=2, saliency_batches=1)
    base.update(depths=sorted(args.layers), tokens=tokens, full_layers=full)
    base["max_accumulator_bytes"] = layer_params(dims) * 2  # one layer at bf16
    specs = [dict(base, config=c) for c in SHAPE_CONFIGS + SHAPE_OPT_IN]
    if args.configs:
        specs = [s for s in specs if s["config"] in args.configs]
    else:
        specs = [s for s in specs if s["config"] not in SHAPE_OPT_IN]
    for s in specs:
        s["threads"] = args.threads
    return specs


# The bytes model of a --shape row (docs/benchmarks.md derives each term). Activations a
# decoder layer saves for backward, per token, in bf16: 8i (gate, up, silu(gate) and the
# product that feeds down) + 16h (two RMSNorms keep a float32 copy of their input: 8h;
# the inputs of q/k/v, o and gate/up and the rotated q: 8h) + 4kv (rotated k, v); 184,320
# B at the 8B widths, 184,968 counted with torch.autograd.graph.saved_tensors_hooks (the
# rest: attention's log-sum-exp). With checkpointing a layer keeps its input (2h).
HEAD_JOINT = 8  # B per logit of 2T tokens: two halves' float32 log-softmax + its grads
HEAD_SINGLE = 12  # B per logit of one batch: log-softmax output, its grad and the result
ADAMW_FP32_TEMPS = 29  # B per entry of the largest weight: dense_adamw_'s float32 copies
ADAMW_TEMPS = 4  # B per entry of the largest weight: torch's bf16 sqrt and division
# B per entry of the largest weight while the CPU select plans it, beside its bf16 saliency:
# float32 scores 4, survivor mask and int16 view 3, survivors' int64 positions ~4 and
# scores ~2, the partition's copy ~2, selection masks 2, a float64 copy for the sums ~4
# (at 50% sparsity); 19.8 B measured above weights, plan and saliency at 2 and 4 layers.
PLAN_TEMPS = 18


def act_per_token(dims: dict, ckpt: bool) -> int:
    """Bytes a decoder layer saves for backward per token (bf16), as derived above."""
    h, i = dims["hidden"], dims["intermediate"]
    kv = h // dims["heads"] * dims["kv_heads"]
    return 2 * h if ckpt else 8 * i + 16 * h + 4 * kv


def state_per_entry(config: str) -> float:
    """Optimizer-state bytes per selected entry (SAU) or per trainable entry (AdamW), bf16
    params: index 4 + moments 8 (or 2 + two float32 scales per 256) + kahan 1 (none with
    stochastic rounding); AdamW 4 (bf16 moments) or 8 (float32), masked + 1 (bool mask)."""
    base = config.removesuffix("-ckpt")
    if base.startswith(("adamw", "masked")):
        per = 8.0 if base.endswith("-fp32") else 4.0
        return per + (1.0 if base.startswith("masked") else 0.0)
    kahan = 0 if "-sr" in config else 1
    return 4 + (2 + 8 / 256 if "-8bit" in config else 8) + kahan


def bytes_model(config: str, dims: dict, layers: int, tokens: int, n_sel: int, bound: int):
    """{term: bytes} of one row at `layers` and its predicted peak RSS ("peak"): the
    interpreter, the bf16 weights, and the largest of the moments the row passes through
    (end of forward / head backward, a layer's recomputed backward, end of backward)."""
    n_train = layers * layer_params(dims)
    largest = dims["hidden"] * dims["intermediate"]  # gate, up and down are the largest
    ckpt = "-ckpt" in config
    t = {"interpreter": sched.INTERPRETER_BYTES, "weights": sched.weight_bytes(dims, layers, 2)}
    if config.startswith("saliency") or config == "plan":
        return _bytes_model_first_phases(config, dims, layers, tokens, n_sel, bound, t)
    per = state_per_entry(config)
    dense = config.startswith(("adamw", "masked"))
    t["state"] = int(per * (n_train if dense else n_sel))
    n = 2 * tokens  # one forward over [forget; retain]
    t["activations"] = layers * act_per_token(dims, ckpt) * n
    t["head"] = HEAD_JOINT * n * dims["vocab"]
    recompute = act_per_token(dims, False) * n if ckpt else 0
    if "compact" in config:
        grads = n_sel * 2 + 2 * largest
    elif "in-backward" in config:
        grads = 2 * largest
    else:
        grads = 2 * n_train
    base = config.removesuffix("-ckpt")
    temps = {"adamw": ADAMW_TEMPS, "masked": ADAMW_TEMPS}.get(base, 0) * largest
    temps = ADAMW_FP32_TEMPS * largest if base.endswith("-fp32") else temps
    t["grads"], t["step_temps"], t["recompute"] = grads, temps, recompute
    moments = [
        t["activations"] + t["head"],
        t["activations"] + recompute + grads,
        grads + temps,
    ]
    t["peak"] = t["interpreter"] + t["weights"] + t["state"] + max(moments)
    return t


def _bytes_model_first_phases(config, dims, layers, tokens, n_sel, bound, t) -> dict:
    """bytes_model of the saliency pass (one batch of `tokens`) and of the plan phase.

    Saliency: the accumulators (bf16) are alive throughout, all of them, or with a bound
    at most `bound` bytes (finished groups leave the process's memory as they leave a
    GPU's: memory_child.groups_to_disk); on top of them the larger of two moments: the
    end of forward with the loss head's buffers, and a weight's hook during backward
    (its bf16 gradient and float32 square; the head's buffers are gone by then).
    Plan: the saliency stays out of memory (memory_child.DiskSaliency, as a GPU run keeps
    it on the host); the plan's index and codes, one layer's bf16 scores as read and the
    selection's temporaries of that layer."""
    n_train = layers * layer_params(dims)
    largest = dims["hidden"] * dims["intermediate"]
    if config == "plan":
        t["plan"] = 5 * n_sel  # int32 index + uint8 code per selected entry
        t["plan_temps"] = (2 + PLAN_TEMPS) * largest
        t["peak"] = sum(t.values())
        return t
    t["saliency"] = min(bound, 2 * n_train) if config.endswith("-bounded") else 2 * n_train
    t["activations"] = layers * act_per_token(dims, False) * tokens
    t["head"] = HEAD_SINGLE * tokens * dims["vocab"]
    t["hook_temps"] = 6 * largest  # one bf16 gradient and its float32 square
    moments = [t["activations"] + t["head"], t["activations"] + t["hook_temps"]]
    t["peak"] = t["interpreter"] + t["weights"] + t["saliency"] + max(moments)
    return t


def model_row(row: dict, spec: dict, raw_depths: list[dict]) -> dict:
    """The bytes model beside a measured row: predicted/measured per depth, and the
    model's own full-depth peak next to the extrapolated measurement."""
    dims, tokens, bound = spec["dims"], spec["tokens"], spec.get("max_accumulator_bytes", 0)
    out = {}
    for d in raw_depths:
        sel = d.get("n_selected") or 0
        pred = bytes_model(row["config"], dims, d["layers"], tokens, sel, bound)
        out[str(d["layers"])] = dict(
            predicted_peak_bytes=pred["peak"],
            measured_peak_bytes=d["peak"],
            ratio=pred["peak"] / d["peak"],
            ratio_above_model=(pred["peak"] - pred["interpreter"] - pred["weights"])
            / max(1, d["peak"] - d["base"]),
            terms=pred,
        )
    last = raw_depths[-1]
    sel_full = int((last.get("n_selected") or 0) * spec["full_layers"] / last["layers"])
    full = bytes_model(row["config"], dims, spec["full_layers"], tokens, sel_full, bound)
    out["full"] = dict(predicted_peak_bytes=full["peak"], terms=full, n_selected=sel_full)
    return out


GPU_BUDGET = 22 * sched.GIB  # what one 24 GB GPU leaves to tensors


def fit_summary(rows: list[dict], k: float = 0.3) -> dict:
    """The leanest step row at full depth, the end-to-end peak (the largest of the
    saliency, plan and step phases, each at its leanest), against GPU_BUDGET, and the
    largest k whose step fits by the bytes model (state per selected entry, linear in k)."""
    full = {r["config"]: r for r in rows if "full_peak_bytes" in r}
    steps = [r for c, r in full.items() if c.startswith("sau")]
    if not steps:
        return {}
    lean = min(steps, key=lambda r: r["full_peak_bytes"])
    phases = {"step": lean["full_peak_bytes"]}
    for phase, prefix in (("saliency", "saliency"), ("plan", "plan")):
        got = [r["full_peak_bytes"] for c, r in full.items() if c.startswith(prefix)]
        if got:
            phases[phase] = min(got)
    terms = lean["bytes_model"]["full"]["terms"]
    n_sel = lean["bytes_model"]["full"]["n_selected"]
    per_entry = state_per_entry(lean["config"])
    fixed = terms["peak"] - terms["state"]
    survivors = n_sel / k
    return dict(
        leanest=lean["config"],
        phases_full_bytes=phases,
        e2e_full_bytes=max(phases.values()),
        budget_bytes=GPU_BUDGET,
        fits=max(phases.values()) <= GPU_BUDGET,
        selected_entries_full=n_sel,
        state_bytes_per_entry=per_entry,
        model_fixed_bytes=fixed,
        largest_k_step_fits=max(0.0, (GPU_BUDGET - fixed) / (per_entry * survivors)),
    )


def shape_table(rows: list[dict]) -> str:
    """Markdown: peak at each depth, the extrapolated and modelled full-depth peaks, and
    the bytes model's predicted/measured ratio at each depth."""
    gib = 2**30
    head = "| configuration | peak GiB (2 / 4 layers) | per layer GiB | 32 layers GiB "
    head += "(extrapolated) | 32 layers GiB (bytes model) | predicted / measured (2 / 4) |"
    lines = [head, "|" + "---|" * 6]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['error']} |")
            continue
        model = r["bytes_model"]
        depths = [k for k in model if k != "full"]
        peaks = " / ".join(f"{model[k]['measured_peak_bytes'] / gib:.2f}" for k in depths)
        ratios = " / ".join(f"{model[k]['ratio']:.2f}" for k in depths)
        per = r.get("per_layer_bytes")
        cells = [
            r["config"],
            peaks,
            f"{per / gib:.3f}" if per is not None else "n/a",
            f"{r['full_peak_bytes'] / gib:.1f}" if "full_peak_bytes" in r else "n/a",
            f"{model['full']['predicted_peak_bytes'] / gib:.1f}",
            ratios,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_runs(args) -> list[dict]:
    """The child specs of this invocation, in run order."""
    if getattr(args, "shape", None):
        return shape_specs(args)
    if args.gpu:
        dims, full, tokens = (TINY_DIMS, 4, 16) if args.tiny else (GPU_DIMS, GPU_LAYERS, 256)
        base = dict(dims=dims, dtype="bfloat16", device=args.device, steps=2, saliency_batches=1)
        step = STEP_CONFIGS + CKPT_CONFIGS
        specs = [dict(base, config=c, depths=[2, 4], tokens=tokens) for c in step]
        e2e = dict(base, depths=[full], tokens=tokens * 2, saliency_batches=2)
        specs += [dict(e2e, config=c) for c in E2E_CONFIGS]
    else:
        dims, layers, tokens = (TINY_DIMS, 2, 16) if args.tiny else (CPU_DIMS, CPU_LAYERS, 256)
        base = dict(dims=dims, dtype="float32", device="cpu", steps=2, saliency_batches=1)
        step = STEP_CONFIGS + CKPT_CONFIGS
        specs = [dict(base, config=c, depths=[layers], tokens=tokens) for c in step]
        if not args.configs:
            specs = [s for s in specs if s["config"] not in CPU_OPT_IN]
    if args.configs:
        specs = [s for s in specs if s["config"] in args.configs]
    for s in specs:
        s["full_layers"] = GPU_LAYERS if args.gpu and not args.tiny else s["depths"][-1]
        s["threads"] = args.threads or (2 if args.gpu else None)  # 16 cores, 8 children
    return specs


def cpu_jobs(specs: list[dict], cache: Path, threads: int | None) -> list[sched.Job]:
    """The CPU run: a `prepare` child builds the model once (benchmarks/memory_cache.py),
    alone and with two threads; every row's child reads it from `cache`. A --shape run
    (two depths) has one prepare child and one child per row and depth instead: they
    pack onto the two cores and into memory more tightly (`merge_depths` joins a row's
    depths again).

    Order of preference: the large rows (AdamW and its variants, ~3.8x the weights each:
    two never fit together) first, the smaller rows beside them; at --shape the longest
    first (the deeper model, then the 8-bit rows), so no long child starts last.
    """
    if not specs:
        return []
    first = specs[0]
    if len(first["depths"]) > 1:
        return _shape_jobs(specs, cache, threads)
    prep = dict(config="prepare", dims=first["dims"], dtype=first["dtype"], device="cpu")
    prep.update(depths=first["depths"], cache=str(cache), threads=2)
    prep["plan"] = any(s["config"].startswith("sau") for s in specs)  # the SAU rows' plan
    order = ["adamw", "sau-in-backward", "masked", "sau-in-backward-ckpt", "sau", "adamw-ckpt"]
    rank = {c: i for i, c in enumerate(order)}
    size = 4 if first["dtype"] == "float32" else 2
    est = sched.estimate("prepare", prep["dims"], prep["depths"][-1], size)
    jobs = [sched.Job(prep, (), est)]
    for spec in sorted(specs, key=lambda s: rank.get(s["config"], len(order))):
        spec.update(cache=str(cache), threads=threads)
        est = sched.estimate(spec["config"], spec["dims"], spec["depths"][-1], size)
        jobs.append(sched.Job(spec, (cache / MODEL_JSON,), est))
    return jobs


# --shape rows from the longest child to the shortest (a 2-core run at 8B widths).
SHAPE_ORDER = (
    "masked-fp32", "masked-fp32-ckpt", "adamw-fp32", "adamw-fp32-ckpt", "adamw",
    "sau-in-backward-8bit-sr-ckpt", "sau-compact-8bit-ckpt", "sau-in-backward-8bit-ckpt",
    "sau-in-backward-ckpt", "sau-ckpt", "sau-in-backward", "sau", "sau-compact-ckpt",
    "sau-compact", "saliency-bf16-bounded", "plan", "saliency-bf16",
)  # fmt: skip


def _shape_jobs(specs: list[dict], cache: Path, threads: int | None) -> list[sched.Job]:
    first, size = specs[0], 2 if specs[0]["dtype"] == "bfloat16" else 4
    prep = dict(config="prepare", dims=first["dims"], dtype=first["dtype"], device="cpu")
    prep.update(cache=str(cache), threads=1, layered=True)
    prep["plan"] = any(s["config"].startswith("sau") for s in specs)
    jobs = []
    for layers in sorted(first["depths"], reverse=True):
        est = sched.estimate("prepare", prep["dims"], layers, size)
        jobs.append(sched.Job(dict(prep, depths=[layers]), (), est))
    rank = {c: i for i, c in enumerate(SHAPE_ORDER)}
    for layers in sorted(first["depths"], reverse=True):
        ready = cache / f"layers-{layers}" / MODEL_JSON
        for spec in sorted(specs, key=lambda s: rank.get(s["config"], len(rank))):
            one = dict(spec, depths=[layers], cache=str(cache), threads=threads)
            est = sched.estimate(spec["config"], spec["dims"], layers, size)
            jobs.append(sched.Job(one, (ready,), est))
    return jobs


def merge_depths(results: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
    """The children of one row (one per depth) as one (spec, result) again, depths in
    ascending order, wall_s summed; the order of first appearance is kept."""
    merged: dict[str, tuple[dict, dict]] = {}
    for spec, res in results:
        name = spec["config"]
        if name not in merged:
            merged[name] = (dict(spec, depths=[]), {"config": name, "depths": [], "wall_s": 0.0})
        whole_spec, whole = merged[name]
        whole_spec["depths"] = sorted(whole_spec["depths"] + spec["depths"])
        whole["wall_s"] += res.get("wall_s") or 0.0
        if "error" in res:  # a child that failed as a whole: its depths carry the error
            whole["depths"] += [{"layers": n, "error": res["error"]} for n in spec["depths"]]
        else:
            whole["depths"] += res["depths"]
        whole["depths"].sort(key=lambda d: d["layers"])
    return list(merged.values())


def run_child(spec: dict, timeout: float) -> dict:
    """One configuration in a fresh interpreter; its RESULT line, or the error it hit."""
    env = dict(os.environ)
    # Large blocks straight from mmap and back to the OS on free, so RSS follows the live
    # tensors (glibc's adaptive threshold would otherwise keep freed activations resident).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(CHILD), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"config": spec["config"], "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
            out["wall_s"] = wall
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"config": spec["config"], "error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def summarize(result: dict, spec: dict) -> dict:
    """A table row: peak, bytes/param by kind, and (GPU) the full-depth extrapolation."""
    row = {"config": result["config"], "wall_s": result.get("wall_s")}
    depths = [d for d in result.get("depths", []) if "error" not in d]
    if "error" in result or not depths:
        row["error"] = result.get("error") or result["depths"][-1].get("error")
        return row
    d = depths[-1]
    n = d["n_params"]
    counted = d["grads_bytes"] + d["state_bytes"] + d["saliency_bytes"]
    row.update(
        layers=d["layers"],
        n_params=n,
        n_trainable=d["n_trainable"],
        sparsity=d["sparsity"],
        base_bytes=d["base"],
        peak_bytes=d["peak"],
        above_base_bytes=d["peak"] - d["base"],
        bpp_weights=d["weight_bytes"] / n,
        bpp_grads=d["grads_bytes"] / n,
        bpp_state=d["state_bytes"] / n,
        bpp_saliency=d["saliency_bytes"] / n,
        # Activations, logits and temporaries: what the peak holds beyond the counted buffers.
        bpp_activations=(d["peak"] - d["base"] - counted) / n,
        extra={k: d[k] for k in ("ru_maxrss", "max_reserved", "build_s", "run_s") if k in d},
    )
    full = spec["full_layers"]
    if len(depths) == 2:
        (a, b) = depths
        per_layer = (b["peak"] - a["peak"]) / (b["layers"] - a["layers"])
        row["per_layer_bytes"] = per_layer
        row["full_layers"] = full
        row["full_peak_bytes"] = b["peak"] + (full - b["layers"]) * per_layer
    return row


def table(rows: list[dict], gpu: bool) -> str:
    """Markdown: peak, bytes/param split, ratio of peaks against torch AdamW."""
    ref = next((r for r in rows if r["config"] == "adamw" and "peak_bytes" in r), None)
    head = "| configuration | peak GiB | above model GiB | weights | grads | optimizer state "
    head += "| saliency | activations & temporaries | peak / AdamW peak |"
    if gpu:
        head += " full-depth peak GiB (extrapolated) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    gib = 2**30
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['error']} |")
            continue
        ratio = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "n/a"
        cells = [
            r["config"],
            f"{r['peak_bytes'] / gib:.2f}",
            f"{r['above_base_bytes'] / gib:.2f}",
            *(f"{r[k]:.2f}" for k in ("bpp_weights", "bpp_grads", "bpp_state", "bpp_saliency")),
            f"{r['bpp_activations']:.2f}",
            ratio,
        ]
        if gpu:
            full = r.get("full_peak_bytes")
            cells.append(f"{full / gib:.1f}" if full else f"{r['peak_bytes'] / gib:.1f} (measured)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_gpu(specs: list[dict], jobs: int, timeout: float) -> tuple[list, dict]:
    """GPU: the step configurations at 2 and 4 layers run `jobs` at a time (each child
    has its own allocator and peak), then the two full-depth e2e runs side by side."""
    waves = [[s for s in specs if not s["config"].startswith("e2e")]]
    waves.append([s for s in specs if s["config"].startswith("e2e")])
    results = []
    for wave in waves:
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(wave) or 1))) as pool:
            for spec, res in zip(wave, pool.map(lambda s: run_child(s, timeout), wave)):
                results.append((spec, res))
                print(f"{spec['config']}: {res.get('error') or 'ok'}", file=sys.stderr)
    return results, {}


def run_cpu(specs: list[dict], args, timeout: float) -> tuple[list, dict]:
    """CPU: prepare once, then the rows `jobs` at a time within the memory budget
    (benchmarks/memory_sched.py), `threads` torch threads each."""
    slots = args.jobs or 2  # the memory budget keeps the large rows from running together
    threads = args.threads or (1 if slots > 1 else None)  # 2 cores: one thread per child
    budget = int(args.mem_budget_gib * sched.GIB) if args.mem_budget_gib else sched.default_budget()

    def run(spec: dict) -> dict:
        res = run_child(spec, timeout)
        print(f"{spec['config']}: {res.get('error') or 'ok'}", file=sys.stderr, flush=True)
        return res

    load_before = sched.loadavg()
    with tempfile.TemporaryDirectory(prefix="sau-memory-") as cache:
        jobs = cpu_jobs(specs, Path(cache), threads)
        results, timeline = sched.run_jobs(jobs, run, slots, budget)
    prep = [res for spec, res in results if spec["config"] == "prepare"]
    rows = merge_depths([(spec, res) for spec, res in results if spec["config"] != "prepare"])
    order = [s["config"] for s in specs]  # the table in the rows' own order, not the run's
    rows.sort(key=lambda row: order.index(row[0]["config"]))
    failed = [p for p in prep if "error" in p]
    if failed:  # nothing could start: say why on every row
        why = f"prepare failed: {failed[0]['error']}"
        rows = [(spec, dict(res, error=why)) for spec, res in rows]
    extra = dict(jobs=slots, threads=threads, mem_budget_gib=round(budget / sched.GIB, 2))
    extra.update(prepare=(prep[0] if len(prep) == 1 else prep) or None, timeline=timeline)
    extra["loadavg"] = {"before": load_before, "after": sched.loadavg()}
    return rows, extra


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA mode (Llama-3.1-8B dims, bf16)")
    ap.add_argument("--tiny", action="store_true", help="tiny model: exercise the code path")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--configs", nargs="*", default=None, help="run only these configurations")
    ap.add_argument("--jobs", type=int, default=None, help="children at once (GPU 8, CPU 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per child")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per child")
    ap.add_argument(
        "--mem-budget-gib",
        type=float,
        default=None,
        help="CPU: the children's estimated peaks together stay below this "
        "(default: MemAvailable at start minus 1.5 GiB)",
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="CPU: real widths")
    ap.add_argument("--dtype", choices=["bfloat16"], default="bfloat16", help="--shape dtype")
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 4], help="--shape depths")
    ap.add_argument("--tokens", type=int, default=None, help="--shape tokens per batch (512)")
    return ap


def _shape_extra(rows: list[dict], results: list) -> dict:
    """--shape: the bytes model beside every row, and the 22 GiB verdict."""
    for row, (spec, res) in zip(rows, results):
        depths = [d for d in res.get("depths", []) if "error" not in d]
        if depths and "error" not in row:
            row["bytes_model"] = model_row(row, spec, depths)
    return {"fit": fit_summary(rows)}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    args.device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    if args.gpu and args.device == "cpu" and not args.tiny:
        print("memory.py: --gpu needs a CUDA device (or --tiny)", file=sys.stderr)
        return 2
    if args.shape and args.gpu:
        print("memory.py: --shape is a CPU mode (the GPU mode has its own widths)", file=sys.stderr)
        return 2
    name = "memory-gpu.json" if args.gpu else "memory-cpu.json"
    name = f"memory-{args.shape.split('-')[-1]}-cpu.json" if args.shape else name
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    specs = plan_runs(args)
    t0 = time.perf_counter()
    if args.gpu:
        results, extra = run_gpu(specs, args.jobs or 8, args.timeout or 80.0)
    else:
        results, extra = run_cpu(specs, args, args.timeout or 900.0)
    rows = [summarize(res, spec) for spec, res in results]
    extra.update(_shape_extra(rows, results) if args.shape else {})
    mode = ("gpu" if args.gpu else "cpu") + (f"-{args.shape}" if args.shape else "")
    doc = {
        "environment": environment(),
        "mode": mode + ("-tiny" if args.tiny else ""),
        "dims": specs[0]["dims"] if specs else None,
        "specs": [spec for spec, _ in results],
        "rows": rows,
        "raw": [res for _, res in results],
        **extra,
        "total_s": time.perf_counter() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(shape_table(rows) if args.shape else table(rows, args.gpu))
    if args.shape:
        print(json.dumps(extra["fit"], indent=1))
    print(f"\nwrote {out} ({doc['total_s']:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
