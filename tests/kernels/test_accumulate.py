"""accumulate_sq_grad_ against the reference and float64 math."""

from __future__ import annotations

import pytest
import torch

import sau_kernels as K
from sau_kernels import reference as R

# (atol, rtol) of the kernel against float64 math, by grad dtype: the inputs are exact in
# float32, so only the float32 rounding of g*g, of the scaling and of the add remain.
TOL = {torch.float32: (0.0, 4e-7), torch.float16: (0.0, 4e-7), torch.bfloat16: (0.0, 4e-7)}
SHAPES = [(0,), (1,), (63,), (4097,), (37, 45)]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_float64(backend, device, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=gen).to(dtype).to(device)
    acc0 = torch.rand(shape, generator=gen).to(device)
    scale = 0.37
    out = acc0.clone()
    ret = K.accumulate_sq_grad_(out, grad, scale=scale, backend=backend)
    assert ret is out
    ref = R.accumulate_sq_grad_(acc0.clone(), grad, scale=scale)
    exact = acc0.double() + scale * grad.double() ** 2
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), exact, atol=atol, rtol=rtol)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_repeated_accumulation_is_a_mean(backend, device):
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(4097, generator=gen).to(device) for _ in range(4)]
    acc = torch.zeros(4097, device=device)
    for g in grads:
        K.accumulate_sq_grad_(acc, g, scale=1 / len(grads), backend=backend)
    expected = torch.stack([g.double() ** 2 for g in grads]).mean(0)
    torch.testing.assert_close(acc.double(), expected, atol=0, rtol=2e-6)


def test_every_element_updated(backend, device):
    # acc is an input too, so NaN poison does not apply; instead every element must move
    # by exactly g^2 (a skipped tail block would leave 1.0 behind).
    grad = torch.full((4097,), 2.0, device=device)
    acc = torch.full((4097,), 1.0, device=device)
    K.accumulate_sq_grad_(acc, grad, backend=backend)
    assert torch.equal(acc, torch.full_like(acc, 5.0))


def test_noncontiguous_grad_and_2d_acc(backend, device):
    grad = torch.randn(64, 48, device=device).t()  # non-contiguous view
    acc = torch.zeros(48, 64, device=device)
    K.accumulate_sq_grad_(acc, grad, backend=backend)
    torch.testing.assert_close(acc, grad.contiguous() ** 2, atol=0, rtol=4e-7)


# bfloat16 acc: the float32 sum is rounded to nearest once per call, so against float64
# math the error is half a bfloat16 ulp (2**-8 relative) plus the float32 rounding before
# it; against the reference (same float32 sum up to one rounding of the product) at most
# one bfloat16 ulp (2**-7) where a float32 difference straddles a rounding midpoint.
BF16_ACC_VS_EXACT = (0.0, 2**-8 + 2**-21)
BF16_ACC_VS_REF = (0.0, 2**-7)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_acc_matches_reference_and_float64(backend, device, dtype, shape):
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(shape, generator=gen).to(dtype).to(device)
    acc0 = torch.rand(shape, generator=gen).to(torch.bfloat16).to(device)
    scale = 0.37
    out = acc0.clone()
    ret = K.accumulate_sq_grad_(out, grad, scale=scale, backend=backend)
    assert ret is out and out.dtype == torch.bfloat16
    ref = R.accumulate_sq_grad_(acc0.clone(), grad, scale=scale)
    exact = acc0.double() + scale * grad.double() ** 2
    torch.testing.assert_close(out.double(), exact, atol=0, rtol=BF16_ACC_VS_EXACT[1])
    torch.testing.assert_close(out.float(), ref.float(), atol=0, rtol=BF16_ACC_VS_REF[1])


def test_bf16_acc_rounds_to_nearest_not_down(backend, device):
    # 1 + 3 * 2**-9 lies 3/4 of the way from 1 to the next bfloat16 (1 + 2**-7): nearest
    # gives 1 + 2**-7, truncation (a plain float32 -> bfloat16 cast in the interpreter)
    # would give 1. Every element must round up, the tail block included.
    acc = torch.ones(4097, dtype=torch.bfloat16, device=device)
    grad = torch.ones(4097, device=device)
    K.accumulate_sq_grad_(acc, grad, scale=3 * 2**-9, backend=backend)
    assert torch.equal(acc, torch.full_like(acc, 1 + 2**-7))


@pytest.mark.parametrize(
    "acc, grad, scale, exc, match",
    [
        (torch.zeros(4, dtype=torch.int32), torch.ones(4), 1.0, TypeError, "acc"),
        (torch.zeros(4, dtype=torch.float16), torch.ones(4), 1.0, TypeError, "acc"),
        (torch.zeros(4), torch.ones(4, dtype=torch.int64), 1.0, TypeError, "grad"),
        (torch.zeros(4), torch.ones(4, dtype=torch.complex64), 1.0, TypeError, "grad"),
        (torch.zeros(4), torch.ones(5), 1.0, ValueError, "acc and grad"),
        (torch.zeros(4), torch.ones(4), -1.0, ValueError, "scale"),
        (torch.zeros(4), torch.ones(4), float("nan"), ValueError, "scale"),
        (torch.zeros(4), torch.ones(4, device="meta"), 1.0, ValueError, "device"),
        (torch.zeros(4, 4).t(), torch.ones(16), 1.0, ValueError, "acc must be contiguous"),
    ],
)
def test_bad_input(acc, grad, scale, exc, match):
    with pytest.raises(exc, match=match):
        K.accumulate_sq_grad_(acc, grad, scale=scale)
