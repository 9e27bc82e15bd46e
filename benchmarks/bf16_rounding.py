"""Does a 16-bit parameter keep the update? Rounding modes x moment bits, measured.

    python benchmarks/bf16_rounding.py [--out benchmarks/results/bf16-rounding.json]
        [--steps 500] [--rows 2048] [--cols 5632]

Two cases, each reporting per configuration the fraction of entries moved (relative to
the entries the reference moves), the update error ||D - D_ref|| / ||D_ref|| over the
updated entries, the mean signed error in units of its standard error (the bias test of
stochastic rounding) and the state bytes per updated entry:

1. "kernel": a Llama-shaped bf16 layer (default 2048 x 5632, TinyLlama's MLP), weights
   N(0, 0.02), 50% pruned by magnitude, k = 0.3 of the survivors chosen at random (the
   rounding question does not depend on which), `steps` AdamW steps at lr 1e-5 on a fixed
   gradient sequence (a per-entry mean plus noise, the same for every configuration),
   through `masked_adamw_`. Reference: the same AdamW in float64 on a float64 master.
   Rows: nearest / kahan / stochastic x 32- / 8-bit moments, and torch.optim.AdamW on
   the bf16 tensor (bf16 moments).
2. "linear": the first user-level case, one 1024 x 1024 nn.Linear (std 0.02, 50% pruned
   by magnitude), saliency and plan from sau (k = 0.3), SAUAdamW(lr=1e-5,
   amplify="update"), 50 steps of a fixed regression loss, forward and backward in the
   parameter's dtype. Reference: the same run in float32.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.env_info import environment  # noqa: E402

HP = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
CONFIGS = [(r, b) for b in (32, 8) for r in ("nearest", "kahan", "stochastic")]


def compare(delta: torch.Tensor, ref: torch.Tensor) -> dict:
    """Moved fraction, relative update error and bias (float64 [n] deltas)."""
    err = delta - ref
    moved_ref = int((ref != 0).sum())
    mean = float(err.mean())
    sem = float(err.std() / math.sqrt(err.numel()))
    return dict(
        moved=int((delta != 0).sum()),
        moved_ref=moved_ref,
        moved_fraction=int((delta != 0).sum()) / max(moved_ref, 1),
        update_error=float(err.norm() / ref.norm()),
        mean_error=mean,
        mean_error_in_sem=mean / sem if sem > 0 else 0.0,
    )


def kernel_case(rows: int, cols: int, steps: int, seed: int = 0) -> dict:
    """Case 1 (module docstring)."""
    from sau_kernels import masked_adamw_
    from sau_kernels.moments8 import num_blocks

    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    w[w.abs() <= w.float().abs().median()] = 0
    survivors = torch.nonzero(w.view(-1) != 0).view(-1)
    pick = torch.randperm(survivors.numel(), generator=gen)[: math.ceil(0.3 * survivors.numel())]
    index = survivors[pick].sort().values.to(torch.int32)
    n = index.numel()
    mean_g = torch.randn(n, generator=gen) * 1e-3

    def grads():
        g_gen = torch.Generator().manual_seed(seed + 1)
        grad = torch.zeros(rows * cols)
        for _ in range(steps):
            grad[index.long()] = mean_g + torch.randn(n, generator=g_gen) * 2e-3
            yield grad.view(rows, cols)

    p0 = w.view(-1)[index.long()].double()
    ref = _float64_run(p0, grads(), steps)
    out = {"shape": [rows, cols], "selected": n, "steps": steps, "rows": {}}
    for rounding, bits in CONFIGS:
        param = w.clone()
        state = _state(n, bits, rounding, num_blocks)
        for t, grad in enumerate(grads(), 1):
            masked_adamw_(param, grad, *state["moments"], index, step=t, **HP,
                          rounding=rounding, check_index=False, **state["extra"])  # fmt: skip
        delta = param.view(-1)[index.long()].double() - p0
        row = compare(delta, ref)
        row["state_bytes_per_entry"] = state["bytes"] / n + 4  # + the int32 index
        out["rows"][f"{rounding}/{bits}"] = row
        print(f"kernel {rounding:>10}/{bits:<2} {row}", flush=True)
    out["rows"]["torch-adamw-bf16"] = _torch_adamw_row(w, index, grads(), p0, ref)
    return out


def _state(n: int, bits: int, rounding: str, num_blocks) -> dict:
    if bits == 32:
        moments = [torch.zeros(n), torch.zeros(n)]
        extra = {}
    else:
        moments = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)]
        extra = dict(exp_avg_scale=torch.zeros(num_blocks(n)),
                     exp_avg_sq_scale=torch.zeros(num_blocks(n)))  # fmt: skip
    if rounding == "kahan":
        extra["compensation"] = torch.zeros(n, dtype=torch.int8)
    nbytes = sum(t.numel() * t.element_size() for t in [*moments, *extra.values()])
    return dict(moments=moments, extra=extra, bytes=nbytes)


def _float64_run(p0: torch.Tensor, grads, steps: int) -> torch.Tensor:
    """AdamW in float64 on the selected entries: the master-weight reference's delta."""
    b1, b2, lr, eps = HP["beta1"], HP["beta2"], HP["lr"], HP["eps"]
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    index = None
    for t, grad in enumerate(grads, 1):
        if index is None:
            index = torch.nonzero(grad.view(-1) != 0).view(-1)  # the first step's support
        g = grad.view(-1)[index].double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
    return p - p0


def _torch_adamw_row(w, index, grads, p0, ref) -> dict:
    param = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([param], lr=HP["lr"], weight_decay=0.0, foreach=False)
    for grad in grads:
        param.grad = grad.to(torch.bfloat16)
        opt.step()
    delta = param.detach().view(-1)[index.long()].double() - p0
    row = compare(delta, ref)
    row["state_bytes_per_entry"] = 4.0  # two bf16 moments, per entry of the whole tensor
    print(f"kernel torch-adamw-bf16 {row}", flush=True)
    return row


def linear_case(steps: int = 50, seed: int = 0, prune: str = "magnitude") -> dict:
    """Case 2 (module docstring); prune="random" zeroes a random half instead."""
    from sau import SAUAdamW, compute_saliency, plan_selection

    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(1024, 1024, generator=gen) * 0.02).to(torch.bfloat16).float()
    if prune == "random":
        w0[torch.rand(w0.shape, generator=gen) < 0.5] = 0
    else:
        w0[w0.abs() <= w0.abs().median()] = 0
    x = torch.randn(64, 1024, generator=gen)
    y = torch.randn(64, 1024, generator=gen) * 0.1

    def loss_fn(model, batch):
        return -((model(batch[0]).float() - batch[1].float()) ** 2).mean()  # ascent

    def make(dtype):
        model = torch.nn.Linear(1024, 1024, bias=False)
        with torch.no_grad():
            model.weight.copy_(w0)
        return model.to(dtype)

    # One saliency (float32) for every run, so all select the same entries.
    sal = compute_saliency(make(torch.float32), [(x, y)], loss_fn, progress=False)

    def run(dtype, rounding, bits):
        model = make(dtype)
        batch = (x.to(dtype), y.to(dtype))
        plan = plan_selection(model.named_parameters(), sal, k=0.3)
        opt = SAUAdamW(model.parameters(), plan=plan, lr=1e-5, amplify="update",
                       rounding=rounding, state_bits=bits)  # fmt: skip
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        index = plan["weight"].selection.index.long()
        out["amplification"] = float(plan["weight"].amplification)
        delta = model.weight.detach().view(-1)[index].double() - w0.view(-1)[index].double()
        return delta, opt.state_nbytes() / index.numel()

    out = {"steps": steps, "prune": prune}
    ref, ref_bytes = run(torch.float32, "nearest", 32)
    out["rows"] = {"float32/32": dict(state_bytes_per_entry=ref_bytes)}
    out["rows"]["floor"] = _floor(w0, sal, ref)
    for rounding, bits in CONFIGS:
        delta, nbytes = run(torch.bfloat16, rounding, bits)
        row = compare(delta, ref)
        row["state_bytes_per_entry"] = nbytes
        out["rows"][f"{rounding}/{bits}"] = row
        print(f"linear {rounding:>10}/{bits:<2} {row}", flush=True)
    return out


def _floor(w0, sal, ref) -> dict:
    """The float32 result rounded once to bfloat16: what no 16-bit parameter can beat."""
    from sau import plan_selection

    model = torch.nn.Linear(1024, 1024, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0)
    index = plan_selection(model.named_parameters(), sal, k=0.3)["weight"].selection.index
    p0 = w0.view(-1)[index.long()].double()
    stored = (p0 + ref).to(torch.bfloat16).double()
    row = compare(stored - p0, ref)
    print(f"linear floor {row}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bf16-rounding.json"))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=5632)
    ap.add_argument("--case", choices=("kernel", "linear", "both"), default="both")
    ap.add_argument("--linear-prune", choices=("magnitude", "random"), default="magnitude")
    args = ap.parse_args(argv)
    result = {"environment": environment()}
    if args.case in ("linear", "both"):
        result["linear"] = linear_case(prune=args.linear_prune)
    if args.case in ("kernel", "both"):
        result["kernel"] = kernel_case(args.rows, args.cols, args.steps)
    out = Path(args.out)
    if out.exists() and args.case != "both":
        raise SystemExit(f"{out} exists; pass another --out")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
