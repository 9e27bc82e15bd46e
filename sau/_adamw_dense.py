"""Plain dense AdamW for parameters outside the plan: torch.optim.AdamW's math, fp32 moments.

The operations and their order are those of torch.optim.adam._single_tensor_adam with
decoupled weight decay, so a float32 parameter follows torch.optim.AdamW to the last bit
(up to the kernels torch picks). Unlike torch, moments are always float32 and a
float16/bfloat16 parameter is updated in float32 and rounded to nearest once per step
(torch would run the whole update, moments included, in the parameter's dtype).
"""

from __future__ import annotations

import torch


def dense_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    nonfinite_count: torch.Tensor | None = None,
) -> None:
    """One AdamW step on all of `param`, in place, with no device sync.

    Args:
        param: float32 | float16 | bfloat16 tensor, updated in place.
        grad: same shape as param, any float dtype.
        exp_avg, exp_avg_sq: float32, shaped like param; updated in place.
        step: the step number after incrementing (>= 1).
        nonfinite_count: optional 0-d int64 tensor; entries with a NaN/inf gradient are
            skipped (param and moments unchanged, as in masked_adamw_) and counted into it
            on the device.

    Non-finite entries are skipped per entry, as the masked kernel does: the step is
    computed out of place and `torch.where(finite, new, old)` keeps the old values where
    the gradient is NaN/inf. Nothing asks the host whether any entry was bad, so the step
    never waits for the device. The price is temporaries of the param's size and one more
    read of the gradient (the finiteness test) than torch.optim.AdamW. Finite entries get
    torch's operations in torch's order, so they follow it to the last bit.
    """
    fp32 = param.dtype == torch.float32
    p = param if fp32 else param.float()
    g = grad if grad.dtype == torch.float32 else grad.float()
    finite = torch.isfinite(g)
    if nonfinite_count is not None:
        nonfinite_count += finite.numel() - finite.sum()  # a device tensor: no sync
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    # A NaN/inf entry computes garbage below; torch.where drops it.
    m = torch.lerp(exp_avg, g, 1 - beta1)
    v = torch.mul(exp_avg_sq, beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    new_p = p.mul(1 - lr * weight_decay) if weight_decay != 0 else p.clone()
    new_p.addcdiv_(m, denom, value=-step_size)
    exp_avg.copy_(torch.where(finite, m, exp_avg))
    exp_avg_sq.copy_(torch.where(finite, v, exp_avg_sq))
    param.copy_(torch.where(finite, new_p, p))  # rounds to param's dtype once
