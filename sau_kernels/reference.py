"""Plain PyTorch versions of every kernel: the test oracle and the benchmark baseline.

Readability first: each function is the math of docs/method.md, line by line, with
the same signature as the fast path (`backend` is accepted and ignored). Argument checks
live in the public launchers; these assume valid input.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from sau_kernels._common import index_dtype, num_selected
from sau_kernels.entry_scale import decode_entry_scale
from sau_kernels.moments8 import code_map
from sau_kernels.rounding import (
    STREAM_EXP_AVG,
    STREAM_EXP_AVG_SQ,
    STREAM_PARAM,
    random_bits,
    stream_salt,
)
from sau_kernels.selection import Selection


def accumulate_sq_grad_(acc, grad, *, scale=1.0, backend=None):
    """acc += scale * grad.float() ** 2, in place, summed in float32.

    Args:
        acc: float32 | bfloat16 tensor, same numel as grad (a bfloat16 acc stores the
            float32 sum rounded to nearest even).
        grad: float32 | float16 | bfloat16 tensor.
    Returns: acc.
    """
    total = acc.reshape(-1).float() + scale * grad.reshape(-1).float() ** 2
    acc.view(-1).copy_(total)
    return acc


def select_topk(scores, weight, k, *, backend=None) -> Selection:
    """The sort-based definition of the selected set G.

    G = {i in S : s_i >= tau and s_i > 0}: an entry with zero saliency carries no forget
    signal and is never selected, so |G| may be below r; when G is empty the threshold is
    reported as +inf (docs/method.md).

    Args:
        scores: float32 saliency, same numel as weight, finite and >= 0.
        weight: the (pruned) weight; survivors are weight != 0.
        k: fraction in (0, 1] of survivors to select.
    Returns: a Selection (see sau_kernels.selection).
    """
    s = scores.reshape(-1)
    survivors = weight.reshape(-1) != 0
    n_survivors = int(survivors.sum())
    r = num_selected(k, n_survivors)
    if r == 0:
        threshold = torch.tensor(float("inf"), dtype=torch.float32, device=s.device)
    else:
        descending = torch.sort(s[survivors], descending=True).values
        threshold = descending[r - 1].clone()
    selected = survivors & (s >= threshold) & (s > 0)
    if not selected.any():
        threshold = torch.tensor(float("inf"), dtype=torch.float32, device=s.device)
    index = torch.nonzero(selected).view(-1).to(index_dtype(s.numel()))
    s64 = s.double()
    return Selection(
        index=index,
        threshold=threshold,
        n_survivors=n_survivors,
        n_selected=int(index.numel()),
        importance_pruned=s64[~survivors].sum(),
        importance_survivors=s64[survivors].sum(),
        importance_selected=s64[selected].sum(),
    )


def masked_adamw_(
    param, grad, exp_avg, exp_avg_sq, index, *, step, lr, beta1, beta2, eps, weight_decay,
    grad_scale=1.0, update_scale=1.0, backend=None, check_index=True, nonfinite_count=None,
    entry_scale=None, entry_scale_max=10.0, rounding="nearest", compensation=None,
    exp_avg_scale=None, exp_avg_sq_scale=None, seed=0, offset=0, compact_grad=False,
) -> None:  # fmt: skip
    """AdamW on param.view(-1)[index] only, with compact moments.

    Same formulas as torch.optim.AdamW, in float32, in the fused kernel's order:
        g = grad[i] * grad_scale
        m = m + (1 - beta1) * (g - m);  v = v * beta2 + (1 - beta2) * (g * g)
        x = p * (1 - lr * wd) - lr * update_scale / bc1 * (m / (sqrt(v) / sqrt(bc2) + eps))
    where p is param[i] (kahan: p + code * unit(p)); x is stored by `rounding` (`_store`).
    Moments: float32, or uint8 codes with exp_avg_scale / exp_avg_sq_scale (`_decode8`).
    An entry with a NaN/inf gradient keeps its param, compensation and moment values and
    is counted; entry_scale scales entry j's step by c_j; compact_grad: grad[j] is index[j]'s.
    """
    dtype = param.dtype
    idx = index.long()
    flat = param.view(-1)
    g = (grad.reshape(-1) if compact_grad else grad.reshape(-1)[idx]).float() * grad_scale
    finite = torch.isfinite(g)
    if nonfinite_count is not None:
        nonfinite_count += (~finite).sum()
    p = flat[idx].float()
    eight_bit = exp_avg_scale is not None
    if eight_bit:  # exp_avg_sq's codes stand for sqrt(v)
        m_old = _decode8(exp_avg, exp_avg_scale, signed=True)
        r_old = _decode8(exp_avg_sq, exp_avg_sq_scale, signed=False)
    m_old, v_old = (m_old, r_old * r_old) if eight_bit else (exp_avg.clone(), exp_avg_sq.clone())
    m = m_old + (1 - beta1) * (g - m_old)
    v = v_old * beta2 + (1 - beta2) * (g * g)
    bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
    # sqrt correctly rounded (float64, rounded once); torch's float32 CPU sqrt is not
    denom = torch.sqrt(v.double()).float() / bias_correction2**0.5 + eps
    x = p
    if dtype != torch.float32 and rounding == "kahan":
        x = p + compensation.float() * _unit(p, dtype)
    step_size = lr * update_scale / bias_correction1
    if entry_scale is not None:
        step_size = step_size * decode_entry_scale(entry_scale, entry_scale_max)
    x = x * (1 - lr * weight_decay) - step_size * (m / denom)
    bits = random_bits(idx + offset, stream_salt(seed, step, STREAM_PARAM))
    stored = _store(x, dtype, rounding, bits, compensation, finite)
    flat[idx[finite]] = stored[finite]
    m = torch.where(finite, m, m_old)
    v = torch.where(finite, v, v_old)
    if not eight_bit:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        return
    r = torch.where(finite, torch.sqrt(v.double()).float(), r_old)
    for values, codes, scales, signed, stream in (
        (m, exp_avg, exp_avg_scale, True, STREAM_EXP_AVG),
        (r, exp_avg_sq, exp_avg_sq_scale, False, STREAM_EXP_AVG_SQ),
    ):
        u = (random_bits(idx + offset, stream_salt(seed, step, stream)) >> 8).float() / 2**24
        new_codes, new_scales = _encode8(values, u, signed)
        codes.copy_(new_codes)
        scales.copy_(new_scales)


def _store(x, dtype, rounding, bits, compensation, finite):
    """x (float32) in the param's dtype (16-bit params; float32 stores x). nearest: round
    to nearest even. kahan: p = nearest(x) and code = round((x - p) / unit(p)) in
    [-127, 127], written into `compensation` at the finite entries. stochastic:
    `_round_stochastic` with the step's random bits."""
    if dtype == torch.float32 or rounding == "nearest":
        return x.to(dtype)
    if rounding == "stochastic":
        return _round_stochastic(x, bits, dtype)
    stored = x.to(dtype)
    code = torch.round((x - stored.float()) / _unit(stored.float(), dtype)).clamp(-127, 127)
    compensation[finite] = code.to(torch.int8)[finite]
    return stored


def _unit(p, dtype):
    """2**-8 of the spacing of p (float32 holding a bf16/fp16 value) in dtype; floored at
    2**-126 (bf16) or 2**-32 (fp16: below 2**-14 the spacing is 2**-24)."""
    _, e = torch.frexp(p)  # p in [2**(e-1), 2**e): spacing 2**(e-8) in bf16, 2**(e-11) in fp16
    shift, floor = (16, 2.0**-126) if dtype == torch.bfloat16 else (19, 2.0**-32)
    unit = torch.pow(2.0, (e - shift).double()).float()
    return torch.where(p == 0, torch.full_like(p, floor), unit.clamp(min=floor))


def _round_stochastic(x, bits, dtype):
    """float32 x -> dtype, up one spacing (away from zero) with the probability of the
    dropped fraction: the dropped low bits of x's pattern plus as many random bits carry."""
    low_bits = 16 if dtype == torch.bfloat16 else 13
    pattern = x.view(torch.int32).long() & 0xFFFFFFFF
    dropped = pattern & ((1 << low_bits) - 1)
    toward_zero = pattern - dropped
    carry = (dropped + (bits & ((1 << low_bits) - 1))) >> low_bits  # 0 or 1
    out = toward_zero + (carry << low_bits)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32)
    if dtype == torch.float16:  # below 2**-14: the fixed grid of 2**-24
        below = torch.floor(x * 2**24)
        u = (bits >> 8).float() / 2**24
        sub = (below + (u < x * 2**24 - below).float()) / 2**24
        out = torch.where(x.abs() < 2**-14, sub, out)
    return out.to(dtype)


def _decode8(codes, scales, *, signed):
    table = code_map(signed, codes.device)
    block = torch.arange(codes.numel(), device=codes.device) // 256
    return table[codes.long()] * scales[block]


def _encode8(values, u, signed):
    """Block scale = max |value| per 256 entries; value / scale rounded stochastically
    (up when u < the fraction of the way to the next map value) to a map value."""
    table = code_map(signed, values.device)
    codes = torch.empty(values.numel(), dtype=torch.uint8, device=values.device)
    scales = []
    for start in range(0, values.numel(), 256):
        part = values[start : start + 256]
        scale = part.abs().max()
        y = part / scale if scale > 0 else torch.zeros_like(part)
        lo = ((table[None, :] <= y[:, None]).sum(1) - 1).clamp(0, table.numel() - 2)
        frac = ((y - table[lo]) / (table[lo + 1] - table[lo])).clamp(0, 1)
        codes[start : start + 256] = (lo + (u[start : start + 256] < frac).long()).to(torch.uint8)
        scales.append(scale)
    return codes, torch.stack(scales) if scales else torch.zeros(0)


def select_global(scores_list, weights, k, *, backend=None) -> list[Selection]:
    """One threshold over several layers: a sort of the concatenated survivor scores.

    r = ceil(k * total survivors); tau = the r-th largest; per layer
    G_l = {weight != 0, s >= tau, s > 0}. Returns one Selection per layer.
    """
    flat = [(s.reshape(-1), w.reshape(-1) != 0) for s, w in zip(scores_list, weights)]
    values = torch.cat([s[surv] for s, surv in flat])
    r = num_selected(k, values.numel())
    if r == 0:
        tau = torch.tensor(float("inf"), dtype=torch.float32, device=values.device)
    else:
        tau = torch.sort(values, descending=True).values[r - 1].clone()
    return [_at_threshold(s, surv, tau) for s, surv in flat]


def select_mass(scores, weight, share, *, backend=None) -> Selection:
    """The smallest top set of survivors holding `share` of their fixed-point saliency.

    q = floor(s * 2**E), E = 62 - ceil(log2 n) - e with max(s) < 2**e and n = numel (every
    sum of q fits in int64). Sort the survivors by score, descending; the first r whose
    running int64 sum of q reaches ceil(share * total) gives tau = s_(r);
    G = {survivors with s >= tau, s > 0}. Returns a Selection.
    """
    s = scores.reshape(-1)
    survivors = weight.reshape(-1) != 0
    tau = torch.tensor(float("inf"), dtype=torch.float32, device=s.device)
    if s.numel() and float(s.max()) > 0:
        exponent = 62 - (s.numel() - 1).bit_length() - math.frexp(float(s.max()))[1]
        descending = torch.sort(s[survivors], descending=True).values
        running = torch.cumsum(torch.floor(descending.double() * 2.0**exponent).long(), 0)
        if running.numel() and int(running[-1]) > 0:
            target = math.ceil(Fraction(share) * int(running[-1]))
            r = int(torch.searchsorted(running, torch.tensor([target]))[0]) + 1
            tau = descending[r - 1].clone()
    return _at_threshold(s, survivors, tau)


def _at_threshold(s, survivors, tau) -> Selection:
    selected = survivors & (s >= tau) & (s > 0)
    if not selected.any():  # as select_topk: +inf whenever G is empty
        tau = torch.tensor(float("inf"), dtype=torch.float32, device=s.device)
    s64 = s.double()
    return Selection(
        index=torch.nonzero(selected).view(-1).to(index_dtype(s.numel())),
        threshold=tau,
        n_survivors=int(survivors.sum()),
        n_selected=int(selected.sum()),
        importance_pruned=s64[~survivors].sum(),
        importance_survivors=s64[survivors].sum(),
        importance_selected=s64[selected].sum(),
    )
