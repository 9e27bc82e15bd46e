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
    """AdamW on param.view(-1)[index] only, with compact float32 moments.

    Same formulas as torch.optim.AdamW (single-tensor path), in float32:
        g = grad[i] * grad_scale
        m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
        p = p * (1 - lr * weight_decay) - lr * update_scale / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

    Args:
        param, grad: same shape, float32 | float16 | bfloat16; param contiguous.
        exp_avg, exp_avg_sq: float32, shape [index.numel()], updated in place.
        index: int32 | int64 flat indices into param.view(-1).
        step: the step number after incrementing (>= 1).
        nonfinite_count: optional 0-d int64 tensor; entries with a NaN/inf gradient are
            skipped (param and moments unchanged) and counted into it.
        entry_scale: optional uint8 codes, one per index entry: the update of entry j is
            also multiplied by c_j = decode_entry_scale(entry_scale, entry_scale_max)[j].
    """
    finite = torch.isfinite(grad.reshape(-1)[index.long()].float() * grad_scale)
    if nonfinite_count is not None:
        nonfinite_count += (~finite).sum()
    idx = index.long()[finite]
    flat = param.view(-1)
    g = grad.reshape(-1)[idx].float() * grad_scale
    p = flat[idx].float()
    all_m, all_v = exp_avg, exp_avg_sq
    exp_avg, exp_avg_sq = all_m[finite], all_v[finite]
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    p.mul_(1 - lr * weight_decay)
    c = 1.0 if entry_scale is None else decode_entry_scale(entry_scale, entry_scale_max)[finite]
    p.addcdiv_(exp_avg * c, denom, value=-lr * update_scale / bias_correction1)
    flat[idx] = p.to(param.dtype)
    all_m[finite], all_v[finite] = exp_avg, exp_avg_sq


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
