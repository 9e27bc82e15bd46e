"""Run the CPU memory table's children a few at a time, as the machine's memory allows.

Each configuration still runs in its own process, so its peak RSS is its own: running two
at once changes their step times, not their peaks (no swap on the VM, so nothing of a
child's resident set is paged out by its neighbour; the only pages the kernel may drop
under pressure are the page cache's). A child starts when the files it needs exist (the
model and plan the `prepare` child writes, benchmarks/memory_cache.py) and when the
estimated peaks of all running children, its own included, fit in the memory budget; a
child alone always runs, as in a serial run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

GIB = 2**30
# Peak RSS beyond the interpreter per byte of model weights: the CPU table's peaks (one
# run at 77b840e; 0.84B fp32 model, 3.11 GiB of weights) minus INTERPRETER_BYTES, divided
# by the weight bytes, rounded up by ~3%. `prepare` holds the model and a layer's temporaries.
PEAK_PER_WEIGHT_BYTE = {
    "prepare": 1.3,
    "adamw": 3.68,
    "masked": 3.9,
    "sau": 2.33,
    "sau-in-backward": 1.87,
    "saliency-fp32": 2.1,
    "saliency-bf16": 1.66,
    "adamw-ckpt": 3.68,
    "sau-in-backward-ckpt": 1.54,
}
# The same for bfloat16 models: the 8B-width rows at 4 layers (memory-8b-cpu.json: peak
# RSS minus INTERPRETER_BYTES over 3.58 GiB of weights), rounded up 2%: tight enough that
# each large row runs beside a small one (two cores busy) within the budget.
PEAK_PER_WEIGHT_BYTE_BF16 = {
    "prepare": 1.6,
    "adamw": 2.6,
    "adamw-fp32": 3.79,
    "masked-fp32": 4.02,
    "sau": 2.05,
    "sau-compact": 1.95,
    "sau-in-backward": 1.95,
    "sau-compact-8bit": 1.64,
    "sau-in-backward-8bit": 1.64,
    "saliency-bf16": 1.79,
    "saliency-bf16-bounded": 1.42,
    "plan": 1.49,
}
INTERPRETER_BYTES = GIB // 2  # python, torch and transformers before the model exists


@dataclasses.dataclass
class Job:
    """One child: its spec, the files it needs before it may start, its estimated peak."""

    spec: dict
    needs: tuple[Path, ...] = ()
    est_bytes: int = 0


def weight_bytes(dims: dict, layers: int, element_size: int) -> int:
    """Bytes of a Llama's parameters (untied embeddings and lm_head, RMSNorm weights)."""
    h, i, v = dims["hidden"], dims["intermediate"], dims["vocab"]
    kv = h // dims["heads"] * dims["kv_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return element_size * (2 * v * h + layers * per_layer + h)


def estimate(config: str, dims: dict, layers: int, element_size: int) -> int:
    """Estimated peak RSS of one child (bytes)."""
    if element_size == 2:
        base = config.replace("-sr", "").replace("-ckpt", "")
        factor = PEAK_PER_WEIGHT_BYTE_BF16.get(base, 4.3)  # these only shrink a row
    else:
        factor = PEAK_PER_WEIGHT_BYTE.get(config, 4.1)  # unknown: the largest, rounded up
    return INTERPRETER_BYTES + int(factor * weight_bytes(dims, layers, element_size))


def _admissible(job: Job, running: dict, budget: int) -> bool:
    if not all(p.exists() for p in job.needs):
        return False
    used = sum(j.est_bytes for j, _ in running.values())
    return not running or used + job.est_bytes <= budget


def run_jobs(
    jobs: list[Job], run: Callable[[dict], dict], slots: int, budget: int, poll: float = 0.5
) -> tuple[list[tuple[dict, dict]], list[dict]]:
    """Run `jobs` (in list order of preference) at most `slots` at once within `budget`.

    Returns ([(spec, result)] in the order of `jobs`, [a timeline row per job: config,
    start_s, end_s relative to the first start, est_gib]). A job whose needed files never
    appear (its producer failed) gets an error result instead of waiting forever.
    """
    pending, running, done = list(jobs), {}, {}
    timeline, t0 = [], time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, slots)) as pool:
        while pending or running:
            while len(running) < slots:
                job = next((j for j in pending if _admissible(j, running, budget)), None)
                if job is None:
                    break
                pending.remove(job)
                running[pool.submit(run, job.spec)] = (job, time.perf_counter() - t0)
            if not running:  # nothing runs, nothing can start: the inputs will never come
                for job in pending:
                    missing = [p.name for p in job.needs if not p.exists()]
                    done[id(job)] = {"config": job.spec["config"], "error": f"no {missing}"}
                break
            finished, _ = wait(list(running), timeout=poll, return_when=FIRST_COMPLETED)
            for fut in finished:
                job, start = running.pop(fut)
                done[id(job)] = fut.result()
                end = time.perf_counter() - t0
                row = dict(config=job.spec["config"], start_s=start, end_s=end)
                timeline.append(dict(row, est_gib=round(job.est_bytes / GIB, 2)))
    return [(j.spec, done[id(j)]) for j in jobs], timeline


def default_budget(margin: int = 3 * GIB // 2) -> int:
    """MemAvailable now minus a margin for the other jobs on the machine."""
    from sau.lab.sweep.core import available_memory_bytes  # the sweep's fit check reads it too

    return max(0, available_memory_bytes() - margin)


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (the run's neighbours, for the record)."""
    return [round(x, 2) for x in os.getloadavg()]
