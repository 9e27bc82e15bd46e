"""amplify="saliency": per-entry update scales in one byte, in masked_adamw_ on both backends."""

from __future__ import annotations

import math

import pytest
import torch

import sau_kernels as K
from sau_kernels import reference as R

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
TOL = {
    torch.float32: (1e-7, 2e-6),
    torch.float16: (1e-4, 2**-10),
    torch.bfloat16: (1e-3, 2**-7),
}
M_ATOL = 1.2e-7


def test_codes_clamp_round_and_one_is_exact():
    s = torch.tensor([0.0, 0.01, 0.5, 1.0, 2.0, 3.0, 100.0])
    code = K.encode_entry_scale(s, 1.0, 10.0)
    assert code.dtype == torch.uint8
    assert code[0] == 0 and code[1] == 0  # clamped at 1 / w_max (s = 0 too)
    assert code[3] == 127 and code[-1] == 254  # c = 1 exactly; clamped at w_max
    c = K.decode_entry_scale(code, 10.0)
    assert float(c[3]) == 1.0
    assert float(c[0]) == pytest.approx(0.1, rel=1e-6) and float(c[-1]) == pytest.approx(10.0)
    # inside the clamp the stored scale is within half a code step (a factor 10**(1/254))
    inside = c[2:6].double() / s[2:6].double()
    assert bool((inside.log().abs() <= math.log(10) / 254 + 1e-7).all())
    # no information (mean <= 0) or w_max == 1: every scale is 1
    assert bool((K.encode_entry_scale(s, 0.0, 10.0) == 127).all())
    assert bool((K.decode_entry_scale(K.encode_entry_scale(s, 1.0, 1.0), 1.0) == 1.0).all())


def make_problem(shape, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    index = torch.nonzero(torch.rand(shape, generator=gen).view(-1) < 0.3).view(-1).int()
    n = index.numel()
    m = torch.randn(n, generator=gen) * 0.1
    v = torch.rand(n, generator=gen) * 0.01
    code = torch.randint(0, 255, (n,), generator=gen, dtype=torch.uint8)
    return [t.to(device) for t in (param, grad, m, v, index, code)]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(0,), (1,), (63,), (4097,), (37, 45)])
def test_matches_reference_and_float64(backend, device, dtype, shape):
    param, grad, m, v, index, code = make_problem(shape, dtype, device=device)
    kw = dict(step=3, **HP, update_scale=1.5, entry_scale=code, entry_scale_max=10.0)
    p_ref, m_ref, v_ref = param.clone(), m.clone(), v.clone()
    R.masked_adamw_(p_ref, grad, m_ref, v_ref, index, **kw)
    # float64 oracle: c_j = 10 ** ((code_j - 127) / 127)
    idx = index.long()
    c = 10.0 ** ((code.double() - 127) / 127)
    g = grad.reshape(-1)[idx].double()
    m64 = 0.9 * m.double() + 0.1 * g
    v64 = 0.999 * v.double() + 0.001 * g * g
    p64 = param.reshape(-1)[idx].double() * (1 - 1e-2 * 0.1) - 1e-2 * 1.5 * c * (
        m64 / (1 - 0.9**3)
    ) / (torch.sqrt(v64 / (1 - 0.999**3)) + 1e-8)

    unselected = torch.ones(param.numel(), dtype=torch.bool, device=device)
    unselected[idx] = False
    p_out = param.clone()
    p_out.view(-1)[unselected] = float("nan")  # must stay NaN: never written
    K.masked_adamw_(p_out, grad, m, v, index, backend=backend, **kw)
    assert torch.isnan(p_out.view(-1)[unselected]).all()
    got = p_out.view(-1)[idx]
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, p_ref.view(-1)[idx], atol=atol, rtol=rtol)
    torch.testing.assert_close(got.double(), p64.to(dtype).double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(m, m_ref, atol=M_ATOL, rtol=1e-6)
    torch.testing.assert_close(v, v_ref, atol=1e-10, rtol=1e-6)


def test_scales_the_update_per_entry(backend, device):
    # eps = 0, zero state, zero param: the first step is -lr * c_j * sign(g_j) exactly.
    n = 255
    param = torch.zeros(n, device=device)
    grad = torch.linspace(-1, 1, n, device=device) + 0.001
    code = torch.arange(n, dtype=torch.uint8, device=device)  # includes 255 (unused code)
    m, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
    index = torch.arange(n, dtype=torch.int32, device=device)
    kw = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0)
    K.masked_adamw_(param, grad, m, v, index, entry_scale=code, backend=backend, **kw)
    want = -1e-3 * K.decode_entry_scale(code, 10.0) * torch.sign(grad)
    torch.testing.assert_close(param, want, atol=0, rtol=1e-6)


def test_nonfinite_entries_skipped_with_entry_scale(backend, device):
    param, grad, m, v, index, code = make_problem((4097,), torch.float32, device=device)
    grad.view(-1)[index[::5].long()] = float("nan")
    count = torch.zeros((), dtype=torch.int64, device=device)
    p_ref, m_ref, v_ref = param.clone(), m.clone(), v.clone()
    R.masked_adamw_(p_ref, grad, m_ref, v_ref, index, step=2, **HP, entry_scale=code)
    K.masked_adamw_(
        param,
        grad,
        m,
        v,
        index,
        step=2,
        backend=backend,
        **HP,
        entry_scale=code,
        nonfinite_count=count,
    )
    assert int(count) == index[::5].numel()
    torch.testing.assert_close(param, p_ref, atol=1e-7, rtol=2e-6)
    torch.testing.assert_close(m, m_ref, atol=M_ATOL, rtol=1e-6)


@pytest.mark.parametrize(
    "code, w_max, exc, match",
    [
        (torch.zeros(3, dtype=torch.int32), 10.0, TypeError, "entry_scale"),
        (torch.zeros(4, dtype=torch.uint8), 10.0, ValueError, "entry_scale"),
        (torch.zeros(3, dtype=torch.uint8), 0.5, ValueError, "entry_scale_max"),
        (torch.zeros(3, dtype=torch.uint8), float("inf"), ValueError, "entry_scale_max"),
    ],
)
def test_bad_input(code, w_max, exc, match):
    with pytest.raises(exc, match=match):
        K.masked_adamw_(
            torch.zeros(10),
            torch.zeros(10),
            torch.zeros(3),
            torch.zeros(3),
            torch.tensor([0, 4, 9], dtype=torch.int32),
            step=1,
            **HP,
            entry_scale=code,
            entry_scale_max=w_max,
        )
