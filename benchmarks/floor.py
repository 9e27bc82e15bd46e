"""The floor of an optimizer step: a kernel that only reads grad and reads+writes param.

No optimizer can move less memory than this for a dense gradient, so the SAU step is
reported as a multiple of it (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _floor_step_kernel(param_ptr, grad_ptr, n, lr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    g = tl.load(grad_ptr + offs, mask=live, other=0.0).to(tl.float32)
    p = tl.load(param_ptr + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(param_ptr + offs, (p - lr * g).to(param_ptr.dtype.element_ty), mask=live)


def floor_step_(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float = 0.0) -> None:
    """p -= lr * g for each pair (lr = 0 keeps values; the bytes move all the same)."""
    for p, g in zip(params, grads):
        n = p.numel()
        block = 4096
        _floor_step_kernel[(triton.cdiv(n, block),)](p, g, n, lr, BLOCK=block)
