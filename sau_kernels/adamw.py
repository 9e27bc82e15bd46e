"""The masked, amplified AdamW step: AdamW on param.view(-1)[index] only.

Optimizer state is compact (one float32 pair per selected entry); entries outside
`index` are never written. Derivation of the bytes moved: benchmarks/bytes.md.
"""

from __future__ import annotations

import math

import torch

from sau_kernels._common import (
    check_contiguous,
    check_float,
    check_index_tensor,
    check_index_values,
    check_same_device,
    check_scalar,
    launch_on_tensor_device,
    resolve_backend,
)
from sau_kernels.entry_scale import decode_entry_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None

if triton is not None:

    @triton.jit
    def _round_to_bf16(x):
        """float32 -> bfloat16, round to nearest even, done on the bits.

        The CPU interpreter's plain .to(bfloat16) truncates; the GPU rounds to nearest.
        Doing it by hand makes both agree with torch's .to(torch.bfloat16). Finite x only
        (a NaN here never reaches a stored param: the optimizer skips non-finite steps).
        """
        bits = x.to(tl.int32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _masked_adamw_kernel(
        param_ptr,
        grad_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        index_ptr,
        n_selected,
        grad_scale,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        sqrt_bc2,
        eps,
        decay,
        step_size,
        nonfinite_ptr,
        entry_scale_ptr,
        log2_scale_max,
        BLOCK: tl.constexpr,
        PARAM_IS_BF16: tl.constexpr,
        COUNT_NONFINITE: tl.constexpr,
        ENTRY_SCALE: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n_selected
        # Flat param/grad offsets in int64 whatever the index dtype.
        idx = tl.load(index_ptr + offs, mask=live, other=0).to(tl.int64)
        g = tl.load(grad_ptr + idx, mask=live, other=0.0).to(tl.float32) * grad_scale
        p = tl.load(param_ptr + idx, mask=live, other=0.0).to(tl.float32)
        m = tl.load(exp_avg_ptr + offs, mask=live, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offs, mask=live, other=0.0)
        # An entry with a NaN/inf gradient is skipped (nothing of it is written), so a
        # NaN never enters the moments; the skips are counted, not hidden.
        finite = tl.abs(g) < float("inf")  # False for NaN too
        live_update = live & finite
        # torch.optim.AdamW's order of operations, so results agree to rounding.
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * (g * g)
        # IEEE sqrt/div (not the fast approximations) to track the PyTorch path.
        denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
        if ENTRY_SCALE:  # amplify="saliency": c_i from its uint8 code (entry_scale.py)
            code = tl.load(entry_scale_ptr + offs, mask=live, other=127).to(tl.float32)
            c = tl.exp2(log2_scale_max * tl.div_rn(code - 127.0, 127.0))
            p = p * decay - (step_size * c) * tl.div_rn(m, denom)
        else:
            p = p * decay - step_size * tl.div_rn(m, denom)
        if COUNT_NONFINITE:
            n_bad = tl.sum((live & ~finite).to(tl.int64), axis=0)
            if n_bad > 0:  # integer atomics only where needed: exact, rarely contended
                tl.atomic_add(nonfinite_ptr, n_bad)
        live = live_update
        tl.store(exp_avg_ptr + offs, m, mask=live)
        tl.store(exp_avg_sq_ptr + offs, v, mask=live)
        if PARAM_IS_BF16:
            p_out = _round_to_bf16(p)
        else:
            p_out = p.to(param_ptr.dtype.element_ty)
        tl.store(param_ptr + idx, p_out, mask=live)


def _scalars(
    *, step, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0, update_scale=1.0
) -> dict:
    # Host-side float64 math, as torch.optim.AdamW does for its Python scalars.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return dict(
        grad_scale=grad_scale,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        sqrt_bc2=math.sqrt(bias_correction2),
        eps=eps,
        decay=1 - lr * weight_decay,
        step_size=lr * update_scale / bias_correction1,
    )


@launch_on_tensor_device
def _masked_adamw_triton(
    param, grad, exp_avg, exp_avg_sq, index, sc: dict, nonfinite, entry
) -> None:
    n = index.numel()
    block = 1024
    grid = (triton.cdiv(n, block),)
    _masked_adamw_kernel[grid](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        index,
        n,
        **sc,
        nonfinite_ptr=exp_avg if nonfinite is None else nonfinite,  # unused if not counting
        entry_scale_ptr=index if entry is None else entry[0],  # unused without codes
        log2_scale_max=0.0 if entry is None else math.log2(entry[1]),
        BLOCK=block,
        PARAM_IS_BF16=param.dtype == torch.bfloat16,
        COUNT_NONFINITE=nonfinite is not None,
        ENTRY_SCALE=entry is not None,
    )


def _masked_adamw_torch(
    param, grad, exp_avg, exp_avg_sq, index, sc: dict, nonfinite, scale=None
) -> None:
    """The PyTorch path: gather, update the compact moments, scatter.

    On a CPU the gathers and the scatter dominate (a 64-byte line holds 16 fp32 entries, so
    at 15% density nearly every line of grad and param is touched); the elementwise work on
    the compact arrays is cheap. Hence: one gather of grad, and for float32 params without
    weight decay a single index_add_ of the update instead of gather + index_copy_ (p + (-u)
    is bitwise p - u).
    """
    idx = index.long()  # index_copy_/index_add_ need int64; cheap next to the gathers
    flat_p = param.view(-1)
    g = grad.view(-1).index_select(0, idx)
    if g.dtype != torch.float32:
        g = g.float()
    if sc["grad_scale"] != 1.0:
        g.mul_(sc["grad_scale"])
    # One reduction detects NaN/inf (a finite sum proves every entry finite); only then pay
    # for the exact mask. An overflowing sum of finite values takes the exact path too.
    if not math.isfinite(float(g.sum())):
        finite = torch.isfinite(g)
        n_bad = int(finite.numel() - finite.sum())
        if n_bad:
            # Rare: step the finite entries alone (same path, on the sub-index), keep the rest.
            m, v = exp_avg[finite], exp_avg_sq[finite]
            sub_scale = None if scale is None else scale[finite]
            _masked_adamw_torch(param, grad, m, v, idx[finite], sc, None, sub_scale)
            exp_avg[finite], exp_avg_sq[finite] = m, v
            if nonfinite is not None:
                nonfinite += n_bad
            return
    exp_avg.lerp_(g, sc["one_minus_beta1"])
    exp_avg_sq.mul_(sc["beta2"]).addcmul_(g, g, value=sc["one_minus_beta2"])
    denom = torch.sqrt(exp_avg_sq, out=g).div_(sc["sqrt_bc2"]).add_(sc["eps"])  # reuses g
    m = exp_avg if scale is None else exp_avg * scale  # amplify="saliency": c_i * m
    if param.dtype == torch.float32 and sc["decay"] == 1.0:
        # addcdiv's order, (value * m) / denom, so both branches round alike
        update = torch.mul(m, -sc["step_size"]).div_(denom)
        flat_p.index_add_(0, idx, update)
        return
    p = flat_p.index_select(0, idx)
    p = p.float() if p.dtype != torch.float32 else p
    p.mul_(sc["decay"]).addcdiv_(m, denom, value=-sc["step_size"])
    flat_p.index_copy_(0, idx, p if param.dtype == torch.float32 else p.to(param.dtype))


def _check_tensors(param, grad, exp_avg, exp_avg_sq, index, nonfinite_count) -> None:
    check_float("param", param)
    check_float("grad", grad)
    check_index_tensor(index)  # first: the checks below read index.numel()
    if grad.shape != param.shape:
        raise ValueError(
            f"grad must have param's shape {tuple(param.shape)}, got {tuple(grad.shape)}"
        )
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_float(name, t, (torch.float32,))
        check_contiguous(name, t)
        if t.numel() != index.numel():
            raise ValueError(
                f"{name} must have one entry per index entry ({index.numel()}), got {t.numel()}"
            )
    check_same_device(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, index=index)
    check_contiguous("param", param)
    if nonfinite_count is not None:
        if (
            not isinstance(nonfinite_count, torch.Tensor)
            or nonfinite_count.dtype != torch.int64
            or nonfinite_count.dim() != 0
        ):
            raise TypeError("nonfinite_count must be a 0-d int64 tensor or None")
        check_same_device(param=param, nonfinite_count=nonfinite_count)


def check_hyperparameters(
    *, step, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0, update_scale=1.0
) -> dict:
    """Validate one step's scalars; returns them as floats (step as int).

    Raises ValueError naming the first bad value: step must be an integer >= 1; lr, eps,
    weight_decay, grad_scale, update_scale finite and >= 0; beta1, beta2 in [0, 1).
    """
    if (
        isinstance(step, bool)
        or not isinstance(step, (int, float))
        or step < 1
        or step != int(step)
    ):
        raise ValueError(f"Invalid step: {step!r} (expected an integer >= 1)")
    out = dict(step=int(step), lr=check_scalar("lr", lr), eps=check_scalar("eps", eps))
    out["weight_decay"] = check_scalar("weight_decay", weight_decay)
    out["beta1"] = check_scalar("beta1", beta1, high=1.0, high_open=True)
    out["beta2"] = check_scalar("beta2", beta2, high=1.0, high_open=True)
    out["grad_scale"] = check_scalar("grad_scale", grad_scale)
    out["update_scale"] = check_scalar("update_scale", update_scale)
    return out


@torch.no_grad()  # updates param and the moments in place; never part of a graph
def masked_adamw_unchecked_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    index,
    *,
    backend=None,
    nonfinite_count=None,
    entry_scale=None,
    entry_scale_max=10.0,
    **hyperparameters,
) -> None:
    """`masked_adamw_` without any argument check: the per-step core of SAUAdamW.

    Same arguments as `masked_adamw_` less `check_index`; the hyperparameters are passed
    by keyword as there: step, lr, beta1, beta2, eps, weight_decay and optionally
    grad_scale, update_scale (default 1.0). The caller guarantees what `masked_adamw_`
    checks (dtypes, shapes, devices, a contiguous param and moments, an index inside
    param without duplicates, scalars in range), as torch.optim's functional cores trust
    their optimizer: SAUAdamW validates its hyper-parameters and its plan once, at
    construction. grad may be non-contiguous.
    """
    if index.numel() == 0:
        return
    sc = _scalars(**hyperparameters)
    grad = grad.contiguous()
    if resolve_backend(backend, param, grad, exp_avg, exp_avg_sq, index) == "triton":
        entry = None if entry_scale is None else (entry_scale.contiguous(), entry_scale_max)
        _masked_adamw_triton(param, grad, exp_avg, exp_avg_sq, index, sc, nonfinite_count, entry)
    else:
        scale = None
        if entry_scale is not None:
            scale = decode_entry_scale(entry_scale.view(-1), entry_scale_max)
        _masked_adamw_torch(param, grad, exp_avg, exp_avg_sq, index, sc, nonfinite_count, scale)


@torch.no_grad()  # updates param and the moments in place; never part of a graph
def masked_adamw_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    index,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_scale=1.0,
    update_scale=1.0,
    backend=None,
    check_index=True,
    nonfinite_count=None,
    entry_scale=None,
    entry_scale_max=10.0,
) -> None:
    """One AdamW step on the entries param.view(-1)[index] only (docs/method.md).

    Math in float32, exactly torch.optim.AdamW's (decoupled weight decay, bias correction):
        g = grad[i] * grad_scale;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
        p = p (1 - lr wd) - lr update_scale / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    Entries not in `index` are bitwise unchanged.

    Args:
        param: float32 | float16 | bfloat16, contiguous; updated in place (rounded to nearest).
        grad: same shape as param, float32 | float16 | bfloat16.
        exp_avg, exp_avg_sq: float32, contiguous, index.numel() entries; updated in place.
        index: 1-D int32 | int64 flat indices into param.view(-1) (sorted is fastest).
        step: step number after incrementing, >= 1.
        lr, eps, weight_decay: >= 0. beta1, beta2: in [0, 1).
        grad_scale, update_scale: the amplification (c_g, c_u) of docs/method.md.
        backend: "triton" | "torch" | None.
        check_index: verify 0 <= index < param.numel() and no duplicates (one read of
            index and a device sync); callers that validated the index once pass False.
        nonfinite_count: optional 0-d int64 tensor on param's device; the number of
            entries skipped for a NaN/inf gradient is added to it (no device sync).
        entry_scale: optional uint8 tensor, one code per index entry: a per-entry update
            scale c_i = entry_scale_max ** ((code - 127) / 127) multiplying update_scale
            (amplify="saliency"; codes from sau_kernels.encode_entry_scale).
        entry_scale_max: the w_max the codes were made with, finite and >= 1.

    An entry whose gradient (times grad_scale) is NaN or inf is skipped: its param and
    moments keep their values; the other entries step normally. `masked_adamw_unchecked_`
    is the same step without these checks.
    """
    _check_tensors(param, grad, exp_avg, exp_avg_sq, index, nonfinite_count)
    hp = check_hyperparameters(
        step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        grad_scale=grad_scale, update_scale=update_scale,
    )  # fmt: skip
    entry_scale_max = _check_entries(param, index, check_index, entry_scale, entry_scale_max)
    masked_adamw_unchecked_(
        param, grad, exp_avg, exp_avg_sq, index, **hp, backend=backend,
        nonfinite_count=nonfinite_count, entry_scale=entry_scale, entry_scale_max=entry_scale_max,
    )  # fmt: skip


def _check_entries(param, index, check_index, entry_scale, entry_scale_max) -> float:
    """The per-entry inputs: entry_scale's codes (uint8, one per index entry, on param's
    device) and their bound (>= 1), then, when check_index, the index values
    (`check_index_values`). Returns entry_scale_max, checked when codes are given."""
    if entry_scale is not None:
        if not isinstance(entry_scale, torch.Tensor) or entry_scale.dtype != torch.uint8:
            got = entry_scale.dtype if isinstance(entry_scale, torch.Tensor) else type(entry_scale)
            raise TypeError(f"entry_scale must be a uint8 tensor of codes or None, got {got}")
        if entry_scale.numel() != index.numel():
            raise ValueError(
                f"entry_scale must have one code per index entry ({index.numel()}), "
                f"got {entry_scale.numel()}"
            )
        check_same_device(param=param, entry_scale=entry_scale)
        entry_scale_max = check_scalar("entry_scale_max", entry_scale_max, low=1.0)
    if check_index and index.numel():
        check_index_values(index, param.numel())
    return entry_scale_max
