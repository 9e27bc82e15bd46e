"""GPU runner: compiled-kernel correctness, then timings against torch, as one JSON.

    python benchmarks/gpu_runner.py --out DIR            # on a GPU (< 6 min on one H100)
    TRITON_INTERPRET=1 python benchmarks/gpu_runner.py --tiny --out DIR   # CPU smoke run

1. Correctness: `pytest tests/kernels` (on a GPU every Triton kernel is compiled), then
   each kernel at full size against sau_kernels.reference.
2. Timings (triton.testing.do_bench medians on a GPU; perf_counter medians otherwise):
   saliency accumulation vs addcmul_; select_topk vs torch.topk / kthvalue on a
   14336x4096 layer; the SAUAdamW step vs torch.optim.AdamW(fused / foreach) and the
   floor kernel on two Llama-3.1-8B decoder layers, fp32 and bf16 params.
Bytes moved per kernel follow benchmarks/bytes.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sau_kernels as K  # noqa: E402
from benchmarks.common import LLAMA_8B, llama_layer_shapes, plan_for, sparse_layers  # noqa: E402
from benchmarks.env_info import environment  # noqa: E402
from sau_kernels import reference as R  # noqa: E402
from sau_kernels._common import num_selected  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SECTOR = 32  # bytes: the DRAM/L2 access granularity of a gather
MOMENT_TOL = 1e-6  # exp_avg absolute, exp_avg_sq relative, kernel vs reference


def bench(fn) -> float:
    """Median milliseconds of fn()."""
    if ON_GPU:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def sectors_touched(index: torch.Tensor, elem_size: int) -> int:
    """Distinct 32-byte sectors holding the indexed elements (index sorted ascending)."""
    sector = torch.div(index.long(), SECTOR // elem_size, rounding_mode="floor")
    return int(torch.unique_consecutive(sector).numel())


# ---------------------------------------------------------------------------- correctness


def run_pytest(out: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider"]
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "pytest-kernels.log").write_text(proc.stdout + proc.stderr)
    last = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or [""]
    return {"returncode": proc.returncode, "summary": last[0], "seconds": time.time() - t}


def check_accumulate(n: int) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.randn(n, device=DEVICE).to(dtype)
        acc0 = torch.rand(n, device=DEVICE)
        got = K.accumulate_sq_grad_(acc0.clone(), g, scale=0.5, backend="triton")
        ref = R.accumulate_sq_grad_(acc0.clone(), g, scale=0.5)
        rel = ((got - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
        out[str(dtype)[6:]] = {"max_rel_err_vs_reference": rel, "ok": rel <= 4e-7}
    return out


def check_select(shape) -> dict:
    """select_topk (triton) against the reference at k = 0.1 and 0.3: bitwise threshold and
    index, importances to 1e-12 relative."""
    scores, weight = layer_scores(shape)
    out = {}
    for k in (0.1, 0.3):
        ref = R.select_topk(scores, weight, k)
        got = K.select_topk(scores, weight, k, backend="triton")
        res = {
            "tau_equal": bool(torch.equal(got.threshold, ref.threshold)),
            "index_equal": bool(torch.equal(got.index, ref.index)),
            "n_selected": got.n_selected,
            "importance_rel_err": max(
                abs(float(getattr(got, f)) - float(getattr(ref, f)))
                / max(float(getattr(ref, f)), 1e-300)
                for f in ("importance_pruned", "importance_survivors", "importance_selected")
            ),
        }
        res["ok"] = res["tau_equal"] and res["index_equal"] and res["importance_rel_err"] < 1e-12
        out[f"k={k}"] = res
    return out


def check_adamw(shape) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        params, grads = sparse_layers([shape], dtype=dtype, device=DEVICE)
        p0, g = params[0].detach(), grads[0]
        index = torch.nonzero(torch.rand(p0.numel(), device=DEVICE) < 0.15).view(-1).int()
        m0 = torch.randn(index.numel(), device=DEVICE) * 0.1
        v0 = torch.rand(index.numel(), device=DEVICE) * 0.01
        kw = dict(
            step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, grad_scale=1.5
        )
        p_ref, m_ref, v_ref = p0.clone(), m0.clone(), v0.clone()
        R.masked_adamw_(p_ref, g, m_ref, v_ref, index, **kw)
        p_got, m_got, v_got = p0.clone(), m0.clone(), v0.clone()
        K.masked_adamw_(p_got, g, m_got, v_got, index, backend="triton", **kw)
        rest = torch.ones(p0.numel(), dtype=torch.bool, device=DEVICE)
        rest[index.long()] = False
        diff_p = (p_got.float() - p_ref.float()).abs().view(-1)[index.long()]
        res = {
            "unselected_bitwise_unchanged": bool(
                torch.equal(p_got.view(-1)[rest], p0.view(-1)[rest])
            ),
            "param_max_abs_diff": diff_p.max().item(),
            "param_frac_differing": (diff_p > 0).float().mean().item(),
            "exp_avg_max_abs_diff": (m_got - m_ref).abs().max().item(),
            "exp_avg_sq_max_rel_diff": ((v_got - v_ref).abs() / v_ref.clamp_min(1e-30))
            .max()
            .item(),
        }
        tol = 1e-6 if dtype == torch.float32 else 2**-7 * 4  # one ulp at |p| <= 4
        # Moments are float32 for every param dtype: a few float32 ulps (H200: m 6e-8, v 0).
        res["ok"] = (
            res["unselected_bitwise_unchanged"]
            and res["param_max_abs_diff"] <= tol
            and res["exp_avg_max_abs_diff"] <= MOMENT_TOL
            and res["exp_avg_sq_max_rel_diff"] <= MOMENT_TOL
        )
        out[str(dtype)[6:]] = res
    return out


# ---------------------------------------------------------------------------- timings


def layer_scores(shape):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weight = torch.randn(shape, generator=gen, device=DEVICE)
    weight[torch.rand(shape, generator=gen, device=DEVICE) < 0.5] = 0
    scores = torch.rand(shape, generator=gen, device=DEVICE) ** 3
    return scores, weight.to(torch.bfloat16)


def time_accumulate(n: int) -> list[dict]:
    rows = []
    acc = torch.zeros(n, device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.randn(n, device=DEVICE).to(dtype)
        nbytes = n * (g.element_size() + 8)
        ours = bench(lambda g=g: K.accumulate_sq_grad_(acc, g, backend="triton"))
        base = bench(lambda g=g: acc.addcmul_(g, g))
        rows.append(
            {
                "grad_dtype": str(dtype)[6:],
                "n": n,
                "sau_ms": ours,
                "addcmul_ms": base,
                "sau_GBps": gbps(nbytes, ours),
                "addcmul_GBps": gbps(nbytes, base),
                "bandwidth_ratio": base / ours,
            }
        )
    return rows


def time_select(shape) -> dict:
    """select_topk against what a user would run instead, on one pruned layer (k = 0.3).

    Baselines: `torch.topk` and `torch.sort` (CUB's radix sort on CUDA) on the compacted
    survivor values only (no mask, no index: a lower bound for any torch route), the
    full route a user writes (mask, topk, threshold, nonzero) and `torch.kthvalue`.
    """
    scores, weight = layer_scores(shape)
    survivors = weight != 0
    vals = scores[survivors]
    r = num_selected(0.3, vals.numel())
    row = {"shape": list(shape), "n": scores.numel(), "n_survivors": vals.numel(), "r": r}
    row["sau_ms"] = bench(lambda: K.select_topk(scores, weight, 0.3, backend="triton"))
    row["torch_topk_values_only_ms"] = bench(lambda: torch.topk(vals, r, sorted=False))
    row["torch_sort_values_only_ms"] = bench(lambda: torch.sort(vals))
    row["torch_topk_full_ms"] = bench(
        lambda: torch.nonzero(
            survivors & (scores >= torch.topk(scores[survivors], r, sorted=False).values.min())
        )
    )
    row["torch_kthvalue_ms"] = bench(lambda: torch.kthvalue(vals, vals.numel() - r + 1))
    try:
        torch.quantile(vals, 0.7)
        row["torch_quantile"] = "ran"
    except RuntimeError as err:
        row["torch_quantile"] = f"refused: {str(err).splitlines()[0][:120]}"
    row["speedup_vs_topk_values_only"] = row["torch_topk_values_only_ms"] / row["sau_ms"]
    row["speedup_vs_sort_values_only"] = row["torch_sort_values_only_ms"] / row["sau_ms"]
    row["speedup_vs_topk_full"] = row["torch_topk_full_ms"] / row["sau_ms"]
    nbytes_pass = scores.numel() * (4 + weight.element_size())
    row["sau_GBps_one_pass"] = gbps(nbytes_pass, row["sau_ms"])
    return row


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + written): the achievable bandwidth
    that turns a kernel's byte count into its floor time."""
    src = torch.empty(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return gbps(2 * src.numel() * 4, ms)


def per_segment_step(opt, params, step: int) -> None:
    """SAUAdamW's planned update launched one segment at a time (one kernel per layer and
    per expert): the path the multi-tensor step replaces, on the optimizer's own state."""
    from sau.optim import _segments

    for p in params:
        st = opt.state[p]
        for start, stop, w in _segments(st):
            if start == stop:
                continue
            K.masked_adamw_(
                p, p.grad, st["exp_avg"][start:stop], st["exp_avg_sq"][start:stop],
                st["index"][start:stop], step=step, lr=1e-6, beta1=0.9, beta2=0.999,
                eps=1e-8, weight_decay=0.0, update_scale=w, backend="triton", check_index=False,
            )  # fmt: skip


def _torch_adamw_rows(row: dict, params) -> None:
    for name, kw in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
        try:
            opt = torch.optim.AdamW(params, lr=1e-6, **kw)
            opt.step()
            row[f"torch_{name}_ms"] = bench(opt.step)
            del opt
        except (RuntimeError, ValueError) as err:
            row[f"torch_{name}_ms"] = None
            row[f"torch_{name}_error"] = str(err).splitlines()[0][:200]


def _step_ratios(row: dict) -> None:
    for key in ("sau_optimizer_ms", "sau_per_segment_ms"):
        for base in ("torch_fused_ms", "torch_foreach_ms", "floor_ms", "own_floor_ms"):
            if row.get(key) and row.get(base):
                row[f"{key[:-3]}_over_{base[:-3]}"] = row[key] / row[base]
    if row.get("sau_per_segment_ms"):
        row["multi_tensor_speedup"] = row["sau_per_segment_ms"] / row["sau_optimizer_ms"]


def time_step(shapes, dtype, bandwidth: float | None = None) -> dict:
    """The SAUAdamW step (k = 0.3, 50% sparse) against per-segment launches, torch's fused
    and foreach AdamW, the dense floor kernel and the step's own bytes at copy bandwidth.

    shapes: 2-D (out, in) Linear weights and/or 3-D (experts, out, in) fused experts.
    """
    from benchmarks.common import attach_grads
    from sau.optim import SAUAdamW

    params, grads = sparse_layers(shapes, dtype=dtype, device=DEVICE)
    attach_grads(params, grads)
    n = sum(p.numel() for p in params)
    esize = params[0].element_size()
    segments = sum(p.shape[0] if p.dim() == 3 else 1 for p in params)
    row = {"param_dtype": str(dtype)[6:], "n_params": n, "n_weights": len(shapes)}
    row["n_segments"] = segments
    sau = SAUAdamW(params, plan=plan_for(params, k=0.3), lr=1e-6, backend="triton")
    sau.step()
    row["sau_optimizer_ms"] = bench(sau.step)
    row["sau_per_segment_ms"] = bench(lambda o=sau: per_segment_step(o, params, 2))
    row["sau_state_bytes_per_param"] = sau.state_nbytes() / n
    states = [sau.state[p] for p in params]
    n_sel = sum(st["index"].numel() for st in states)
    sectors = sum(sectors_touched(st["index"], esize) for st in states)
    row["sau_bytes_model"] = n_sel * (4 + 16) + sectors * SECTOR * 3  # grad r, param r+w
    del sau, states
    if ON_GPU:
        from benchmarks.floor import floor_step_

        row["floor_ms"] = bench(lambda: floor_step_(params, grads))
    row["floor_bytes"] = n * (2 * esize + grads[0].element_size())
    if bandwidth:
        row["copy_GBps"] = bandwidth
        row["own_floor_ms"] = row["sau_bytes_model"] / (bandwidth * 1e9) * 1e3
    _torch_adamw_rows(row, params)
    _step_ratios(row)
    row["sau_GBps_model"] = gbps(row["sau_bytes_model"], row["sau_optimizer_ms"])
    return row


def moe_shapes(hidden: int, expert_inter: int, experts: int, shared_inter: int, n_layers: int):
    """The planned weights of `n_layers` Qwen2-MoE decoder layers: q, k, v, o, the fused
    experts' gate_up [E, 2 I, H] and down [E, H, I], and the shared expert's three."""
    one = [(hidden, hidden)] * 4 + [(experts, 2 * expert_inter, hidden)]
    one += [(experts, hidden, expert_inter)]
    one += [(shared_inter, hidden), (shared_inter, hidden), (hidden, shared_inter)]
    return one * n_layers


# Qwen1.5-MoE-A2.7B / Qwen2-MoE widths: hidden 2048, 60 experts of 1408, shared 5632.
QWEN2_MOE = dict(hidden=2048, expert_inter=1408, experts=60, shared_inter=5632)
SELECT_SHAPES = ((1024, 4096), (4096, 4096), (14336, 4096))  # 4.2M, 16.8M, 58.7M entries
TINY_SELECT_SHAPES = ((64, 64), (128, 128), (448, 128))


def sizes(tiny: bool) -> dict:
    """Problem sizes of one run: full (a GPU) or tiny (the CPU interpreter smoke run)."""
    if tiny:
        return dict(
            check=(448, 128), select=TINY_SELECT_SHAPES, n_acc=1 << 14,
            llama=llama_layer_shapes(64, 224, 16),
            moe=moe_shapes(hidden=64, expert_inter=32, experts=6, shared_inter=96, n_layers=1),
        )  # fmt: skip
    check = (LLAMA_8B["intermediate"], LLAMA_8B["hidden"])
    return dict(
        check=check, select=SELECT_SHAPES, n_acc=check[0] * check[1],
        llama=llama_layer_shapes(**LLAMA_8B, n_layers=2), moe=moe_shapes(**QWEN2_MOE, n_layers=1),
    )  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU interpreter smoke run)")
    ap.add_argument("--skip-pytest", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    z = sizes(args.tiny)
    result = {"environment": environment(), "tiny": args.tiny, "sections": {}}
    bandwidth = {}
    steps = [("pytest_kernels", lambda: run_pytest(args.out))] if not args.skip_pytest else []
    steps += [
        ("check_accumulate", lambda: check_accumulate(z["n_acc"])),
        ("check_select", lambda: check_select(z["check"])),
        ("check_adamw", lambda: check_adamw(z["check"])),
        ("copy_bandwidth", lambda: bandwidth.setdefault("GBps", copy_bandwidth(z["n_acc"] * 16))),
        ("time_accumulate", lambda: time_accumulate(z["n_acc"])),
        ("time_select", lambda: [time_select(shape) for shape in z["select"]]),
    ]
    for label in ("llama", "moe"):
        for dtype in (torch.float32, torch.bfloat16):
            name = f"time_step_{label}_{str(dtype)[6:]}"
            steps.append((name, lambda s=z[label], d=dtype: time_step(s, d, bandwidth.get("GBps"))))
    path = args.out / ("gpu-results.json" if ON_GPU else "runner-smoke.json")
    for name, fn in steps:
        t = time.time()
        try:
            result["sections"][name] = fn()
        except Exception:  # keep going: one broken section must not lose the others
            result["sections"][name] = {"error": traceback.format_exc()}
        print(
            f"[{time.time() - t:6.1f}s] {name}: {json.dumps(result['sections'][name])[:600]}",
            flush=True,
        )
        path.write_text(json.dumps(result, indent=2) + "\n")  # after every section
        if ON_GPU:
            torch.cuda.empty_cache()
    result["failed"] = failed_sections(result["sections"])
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if result["failed"]:
        print(f"FAILED: {', '.join(result['failed'])}", file=sys.stderr)
        return 1
    return 0


def failed_sections(sections: dict) -> list[str]:
    """Names of the sections that failed: an exception, a check with ok False anywhere
    inside, or a non-zero pytest return code."""

    def bad(value) -> bool:
        if isinstance(value, dict):
            if "error" in value or value.get("ok") is False or value.get("returncode", 0):
                return True
            return any(bad(v) for v in value.values())
        if isinstance(value, list):
            return any(bad(v) for v in value)
        return False

    return [name for name, value in sections.items() if bad(value)]


if __name__ == "__main__":
    sys.exit(main())
