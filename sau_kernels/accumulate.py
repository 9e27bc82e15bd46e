"""Saliency accumulation: acc += scale * grad.float() ** 2 (the diagonal empirical Fisher).

One streaming pass: read grad (2 or 4 bytes), read and write acc (8 bytes for a float32
acc, 4 for a bfloat16 one) per element. A bfloat16 acc halves the saliency pass's
largest buffer; the sum is still formed in float32 and rounded to nearest once per call.
"""

from __future__ import annotations

import torch

from sau_kernels._common import (
    check_contiguous,
    check_float,
    check_same_device,
    check_same_numel,
    check_scalar,
    launch_on_tensor_device,
    resolve_backend,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None

if triton is not None:
    from sau_kernels.rounding import round_nearest_tl

    @triton.jit
    def _accumulate_sq_grad_kernel(
        acc_ptr, grad_ptr, n, scale, BLOCK: tl.constexpr, ACC_IS_BF16: tl.constexpr
    ):
        # The block's start in int64 (pid * BLOCK overflows int32 past 2**31 elements),
        # moved into the pointers; the offsets inside a block are int32: int64 offsets,
        # two registers each for BLOCK / 128 lanes a thread, made ptxas spill on sm_120.
        start = tl.program_id(0).to(tl.int64) * BLOCK
        acc_ptr += start
        grad_ptr += start
        offs = tl.arange(0, BLOCK)
        live = offs < tl.minimum(n - start, BLOCK).to(tl.int32)
        g = tl.load(grad_ptr + offs, mask=live, other=0.0).to(tl.float32)
        acc = tl.load(acc_ptr + offs, mask=live, other=0.0).to(tl.float32)
        total = acc + scale * (g * g)  # float32 whatever acc stores
        if ACC_IS_BF16:
            # nearest even; the interpreter's cast truncates (exact once rounded)
            total = round_nearest_tl(total, True).to(tl.bfloat16)
        tl.store(acc_ptr + offs, total, mask=live)


@launch_on_tensor_device
def _accumulate_triton(acc: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    n = acc.numel()
    block = 4096
    grid = (triton.cdiv(n, block),)
    _accumulate_sq_grad_kernel[grid](
        acc, grad, n, scale, BLOCK=block, ACC_IS_BF16=acc.dtype == torch.bfloat16
    )


def _accumulate_torch(acc: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    g = grad.view(-1)
    if g.dtype != torch.float32:
        g = g.float()
    if acc.dtype == torch.float32:
        acc.view(-1).addcmul_(g, g, value=scale)
        return
    # bfloat16 acc: sum in float32, round to nearest even once (a float32 temporary of
    # one layer, the size of a float32 gradient; the Triton kernel needs none).
    acc.view(-1).copy_(acc.view(-1).float().addcmul_(g, g, value=scale))


@torch.no_grad()  # acc is a statistic of gradients, never part of a graph
def accumulate_sq_grad_(acc, grad, *, scale=1.0, backend=None):
    """Accumulate squared gradients in float32, in place: acc += scale * grad.float()**2.

    Args:
        acc: float32 | bfloat16 tensor, contiguous, any shape with grad.numel() elements.
            A bfloat16 acc is read as float32, summed in float32 and stored rounded to
            nearest even (half the memory; ~2**-9 relative rounding per call).
        grad: float32 | float16 | bfloat16 tensor (any layout; read only).
        scale: finite float >= 0 (e.g. 1 / number of batches for a mean).
        backend: "triton" | "torch" | None (see sau_kernels docs).
    Returns:
        acc.
    """
    check_float("acc", acc, (torch.float32, torch.bfloat16))
    check_float("grad", grad)
    check_same_numel("acc", acc, "grad", grad)
    check_same_device(acc=acc, grad=grad)
    check_contiguous("acc", acc)
    scale = check_scalar("scale", scale)
    if acc.numel() == 0:
        return acc
    grad = grad.contiguous()  # a read-only copy is harmless
    if resolve_backend(backend, acc, grad) == "triton":
        _accumulate_triton(acc, grad, scale)
    else:
        _accumulate_torch(acc, grad, scale)
    return acc
