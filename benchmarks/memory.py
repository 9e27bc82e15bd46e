"""Peak memory of one real unlearning step, per configuration, each in a fresh process.

    python benchmarks/memory.py                 # CPU table (`make bench-memory`, < 10 min)
    python benchmarks/memory.py --configs adamw-ckpt \
        --out benchmarks/results/memory-cpu-ckpt.json   # the opt-in CPU row, its own file
    python benchmarks/memory.py --tiny          # the same code path in seconds
    python benchmarks/memory.py --gpu --out F   # CUDA: Llama-3.1-8B dimensions, bf16
    python benchmarks/memory.py --gpu --tiny --out F   # the GPU code path at a tiny size

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
measured at the full depth (32 layers) at T = 512.
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


def plan_runs(args) -> list[dict]:
    """The child specs of this invocation, in run order."""
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
    alone and with two threads; every row's child reads it from `cache`.

    Order of preference: the three large rows (torch AdamW and its variants, ~3.8x the
    weights each: two never fit together) first, the smaller rows beside them.
    """
    if not specs:
        return []
    first = specs[0]
    prep = dict(config="prepare", dims=first["dims"], dtype=first["dtype"], device="cpu")
    prep.update(depths=first["depths"], cache=str(cache), threads=2)
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
    slots = args.jobs or 2
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
    rows = [(spec, res) for spec, res in results if spec["config"] != "prepare"]
    if prep and "error" in prep[0]:  # nothing could start: say why on every row
        why = f"prepare failed: {prep[0]['error']}"
        rows = [(spec, dict(res, error=why)) for spec, res in rows]
    extra = dict(jobs=slots, threads=threads, mem_budget_gib=round(budget / sched.GIB, 2))
    extra.update(prepare=prep[0] if prep else None, timeline=timeline)
    extra["loadavg"] = {"before": load_before, "after": sched.loadavg()}
    return rows, extra


def main(argv=None) -> int:
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
    args = ap.parse_args(argv)
    import torch

    args.device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    if args.gpu and args.device == "cpu" and not args.tiny:
        print("memory.py: --gpu needs a CUDA device (or --tiny)", file=sys.stderr)
        return 2
    name = "memory-gpu.json" if args.gpu else "memory-cpu.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    specs = plan_runs(args)
    t0 = time.perf_counter()
    if args.gpu:
        results, extra = run_gpu(specs, args.jobs or 8, args.timeout or 80.0)
    else:
        results, extra = run_cpu(specs, args, args.timeout or 900.0)
    rows = [summarize(res, spec) for spec, res in results]
    doc = {
        "environment": environment(),
        "mode": ("gpu" if args.gpu else "cpu") + ("-tiny" if args.tiny else ""),
        "dims": specs[0]["dims"] if specs else None,
        "specs": [spec for spec, _ in results],
        "rows": rows,
        "raw": [res for _, res in results],
        **extra,
        "total_s": time.perf_counter() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(rows, args.gpu))
    print(f"\nwrote {out} ({doc['total_s']:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
