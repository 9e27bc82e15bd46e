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
    """One AdamW step on all of `param`, in place.

    Args:
        param: float32 | float16 | bfloat16 tensor, updated in place.
        grad: same shape as param, any float dtype.
        exp_avg, exp_avg_sq: float32, shaped like param; updated in place.
        step: the step number after incrementing (>= 1).
        nonfinite_count: optional 0-d int64 tensor; entries with a NaN/inf gradient are
            skipped (param and moments unchanged, as in masked_adamw_) and counted into it.
    """
    finite = torch.isfinite(grad)
    n_bad = finite.numel() - finite.sum()  # one reduction; stays on the device
    if nonfinite_count is not None:
        nonfinite_count += n_bad
    if bool(n_bad):  # rare: update the finite entries through the masked kernel path
        from sau_kernels import masked_adamw_

        index = torch.nonzero(finite.view(-1)).view(-1)
        m, v = exp_avg.view(-1)[index], exp_avg_sq.view(-1)[index]
        masked_adamw_(
            param,
            grad,
            m,
            v,
            index,
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            backend="torch",
            check_index=False,
        )
        exp_avg.view(-1)[index], exp_avg_sq.view(-1)[index] = m, v
        return
    fp32 = param.dtype == torch.float32
    p = param if fp32 else param.float()
    g = grad if grad.dtype == torch.float32 else grad.float()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    if not fp32:
        param.copy_(p)
