"""masked_adamw_ against the reference, float64 math and torch.optim.AdamW."""

from __future__ import annotations

import math

import pytest
import torch

import sau_kernels as K
from sau_kernels import reference as R

# (atol, rtol) for params by dtype. float32: the kernel and the reference differ only in
# float32 rounding order. Half types: one unit in the last place of the stored param.
TOL = {
    torch.float32: (1e-7, 2e-6),
    torch.float16: (1e-4, 2**-10),
    torch.bfloat16: (1e-3, 2**-7),
}
# The first moment is a lerp that cancels terms of size ~|g| <= ~4 (scaled randn): their
# float32 rounding, ~4 * 6e-8 / 2, is the absolute error floor of m near zero.
M_ATOL = 1.2e-7
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
SHAPES = [(0,), (1,), (63,), (4097,), (37, 45)]


def make_problem(shape, dtype, density=0.3, seed=0, device="cpu", index_dtype=torch.int32):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    chosen = torch.rand(shape, generator=gen).view(-1) < density
    index = torch.nonzero(chosen).view(-1).to(index_dtype)
    n = index.numel()
    m = torch.randn(n, generator=gen) * 0.1
    v = torch.rand(n, generator=gen) * 0.01
    return [t.to(device) for t in (param, grad, m, v, index)]


def float64_step(
    param,
    grad,
    m,
    v,
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
):
    idx = index.long()
    g = grad.reshape(-1)[idx].double() * grad_scale
    p = param.reshape(-1)[idx].double()
    m = beta1 * m.double() + (1 - beta1) * g
    v = beta2 * v.double() + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    p = p * (1 - lr * weight_decay) - lr * update_scale * (m / bc1) / (torch.sqrt(v / bc2) + eps)
    return p, m, v


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scales", [(1.0, 1.0), (2.5, 1.0), (1.0, 3.0)])
def test_matches_reference_and_float64(backend, device, dtype, shape, scales):
    param, grad, m, v, index = make_problem(shape, dtype, device=device)
    kw = dict(step=3, **HP, grad_scale=scales[0], update_scale=scales[1])
    p_ref, m_ref, v_ref = param.clone(), m.clone(), v.clone()
    R.masked_adamw_(p_ref, grad, m_ref, v_ref, index, **kw)
    p64, m64, v64 = float64_step(param, grad, m, v, index, **kw)

    # Poison every entry the kernel must not touch: it must stay NaN, bitwise.
    unselected = torch.ones(param.numel(), dtype=torch.bool, device=device)
    unselected[index.long()] = False
    p_out = param.clone()
    p_out.view(-1)[unselected] = float("nan")
    K.masked_adamw_(p_out, grad, m, v, index, backend=backend, **kw)

    assert torch.isnan(p_out.view(-1)[unselected]).all()
    got = p_out.view(-1)[index.long()]
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, p_ref.view(-1)[index.long()], atol=atol, rtol=rtol)
    torch.testing.assert_close(got.double(), p64.to(dtype).double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(m, m_ref, atol=M_ATOL, rtol=1e-6)
    torch.testing.assert_close(v, v_ref, atol=1e-10, rtol=1e-6)
    torch.testing.assert_close(m.double(), m64, atol=M_ATOL, rtol=1e-6)
    torch.testing.assert_close(v.double(), v64, atol=1e-10, rtol=1e-6)


def test_int64_index_and_unsorted_index(backend, device):
    param, grad, m, v, index = make_problem(
        (4097,), torch.float32, device=device, index_dtype=torch.int64
    )
    perm = torch.randperm(index.numel(), generator=torch.Generator().manual_seed(0)).to(device)
    index, m, v = index[perm], m[perm].contiguous(), v[perm].contiguous()
    p_ref, m_ref, v_ref = param.clone(), m.clone(), v.clone()
    R.masked_adamw_(p_ref, grad, m_ref, v_ref, index, step=1, **HP)
    K.masked_adamw_(param, grad, m, v, index, step=1, backend=backend, **HP)
    torch.testing.assert_close(param, p_ref, atol=1e-7, rtol=2e-6)
    torch.testing.assert_close(m, m_ref, atol=M_ATOL, rtol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_many_steps_equal_torch_adamw_on_selected(backend, device, weight_decay):
    # torch.optim.AdamW on a dense copy whose gradient is zero outside G: selected entries
    # must follow it step for step; the others we never touch (torch would decay them).
    gen = torch.Generator().manual_seed(7)
    param = torch.randn(37, 45, generator=gen).to(device)
    index = torch.nonzero(torch.rand(37 * 45, generator=gen) < 0.2).view(-1).int().to(device)
    dense = param.clone().requires_grad_(True)
    opt = torch.optim.AdamW(
        [dense], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, foreach=False
    )
    m = torch.zeros(index.numel(), device=device)
    v = torch.zeros_like(m)
    untouched = param.clone()
    for step in range(1, 21):
        grad = torch.randn(37, 45, generator=gen).to(device)
        masked = torch.zeros_like(grad).view(-1)
        masked[index.long()] = grad.view(-1)[index.long()]
        dense.grad = masked.view_as(grad)
        opt.step()
        K.masked_adamw_(
            param,
            grad,
            m,
            v,
            index,
            step=step,
            lr=1e-2,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            weight_decay=weight_decay,
            backend=backend,
        )
        sel = index.long()
        torch.testing.assert_close(
            param.view(-1)[sel], dense.detach().view(-1)[sel], atol=1e-7, rtol=1e-6
        )
        state = opt.state[dense]
        torch.testing.assert_close(m, state["exp_avg"].view(-1)[sel], atol=M_ATOL, rtol=1e-6)
        torch.testing.assert_close(v, state["exp_avg_sq"].view(-1)[sel], atol=1e-10, rtol=1e-6)
    rest = torch.ones(param.numel(), dtype=torch.bool, device=device)
    rest[index.long()] = False
    assert torch.equal(param.view(-1)[rest], untouched.view(-1)[rest])  # bitwise


def test_zero_size_is_a_no_op(backend, device):
    param = torch.randn(8, device=device)
    before = param.clone()
    empty = torch.zeros(0, device=device)
    K.masked_adamw_(
        param,
        torch.randn(8, device=device),
        empty,
        empty.clone(),
        torch.zeros(0, dtype=torch.int32, device=device),
        step=1,
        backend=backend,
        **HP,
    )
    assert torch.equal(param, before)
    z = torch.zeros(0, device=device)
    K.masked_adamw_(
        z,
        z.clone(),
        z.clone(),
        z.clone(),
        torch.zeros(0, dtype=torch.int64, device=device),
        step=1,
        backend=backend,
        **HP,
    )


def _call(**over):
    args = dict(
        param=torch.zeros(10),
        grad=torch.zeros(10),
        exp_avg=torch.zeros(3),
        exp_avg_sq=torch.zeros(3),
        index=torch.tensor([0, 4, 9], dtype=torch.int32),
    )
    kw = dict(step=1, **HP)
    for key, val in over.items():
        (args if key in args else kw)[key] = val
    K.masked_adamw_(
        args.pop("param"),
        args.pop("grad"),
        args.pop("exp_avg"),
        args.pop("exp_avg_sq"),
        args.pop("index"),
        **kw,
    )


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(beta1=1.0), ValueError, "beta1"),
        (dict(beta2=-0.1), ValueError, "beta2"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(step=0), ValueError, "step"),
        (dict(step=1.5), ValueError, "step"),
        (dict(param=torch.zeros(10, dtype=torch.int32)), TypeError, "param"),
        (dict(param=torch.zeros(10, dtype=torch.complex64)), TypeError, "param"),
        (dict(grad=torch.zeros(10, dtype=torch.float64)), TypeError, "grad"),
        (dict(grad=torch.zeros(11)), ValueError, "grad"),
        (dict(exp_avg=torch.zeros(4)), ValueError, "exp_avg"),
        (dict(exp_avg_sq=torch.zeros(3, dtype=torch.bfloat16)), TypeError, "exp_avg_sq"),
        (dict(index=torch.tensor([0.0, 1.0, 2.0])), TypeError, "index"),
        (dict(index=torch.tensor([0, 4, 10], dtype=torch.int32)), IndexError, "index"),
        (dict(index=torch.tensor([-1, 4, 9])), IndexError, "index"),
        (dict(index=torch.tensor([[0, 4, 9]])), ValueError, "index must be 1-D"),
        (dict(grad=torch.zeros(10, device="meta")), ValueError, "device"),
        (
            dict(param=torch.zeros(20)[::2], grad=torch.zeros(10)),
            ValueError,
            "param must be contiguous",
        ),
    ],
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_grad_scale_constant_in_time_is_almost_a_no_op(backend, device):
    # Adam's m / sqrt(v) is invariant to a constant gradient scale, so
    # amplify="grad" changes the update only through eps. With eps = 0 it is exact to
    # rounding; amplify="update" scales the step by the factor.
    param, grad, m, v, index = make_problem((4097,), torch.float32, device=device)
    m.zero_(), v.zero_()
    param.zero_()  # so p_new - p is the update itself, not a difference of rounded values
    base = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0)
    outs = {}
    for name, gs, us in (("plain", 1.0, 1.0), ("grad", 4.0, 1.0), ("update", 1.0, 4.0)):
        p = param.clone()
        K.masked_adamw_(
            p,
            grad,
            m.clone(),
            v.clone(),
            index,
            grad_scale=gs,
            update_scale=us,
            backend=backend,
            **base,
        )
        outs[name] = (p - param).view(-1)[index.long()]
    torch.testing.assert_close(outs["grad"], outs["plain"], atol=0, rtol=1e-5)
    torch.testing.assert_close(outs["update"], 4 * outs["plain"], atol=0, rtol=1e-5)
    assert not math.isclose(float(outs["update"].abs().sum()), float(outs["plain"].abs().sum()))


def test_updates_a_leaf_parameter_with_grad_mode_on(backend, device):
    # Users call it on nn.Parameters outside torch.no_grad(): it must not trip autograd.
    param = torch.nn.Parameter(torch.randn(63, device=device))
    grad = torch.randn(63, device=device)
    index = torch.arange(0, 63, 3, dtype=torch.int32, device=device)
    m, v = torch.zeros(21, device=device), torch.zeros(21, device=device)
    before = param.detach().clone()
    K.masked_adamw_(param, grad, m, v, index, step=1, backend=backend, **HP)
    assert not torch.equal(param.detach()[::3], before[::3])
    assert torch.equal(param.detach()[1::3], before[1::3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_param_rounded_to_nearest_even(backend, device, dtype):
    # First step with eps = 0 moves p by exactly lr * sign(g) in float32; choose lr so the
    # float32 result sits just above, exactly on, and just below half a unit of the storage
    # dtype under 1.0. Truncation (or round-half-up) would give the other neighbour.
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # spacing just below 1.0
    lrs = [ulp * 0.25, ulp * 0.5, ulp * 0.75, ulp * 1.5]
    expected = [1.0, 1.0, 1.0 - ulp, 1.0 - 2 * ulp]  # ulp * 1.5: tie, even is 1 - 2 ulp
    for lr, want in zip(lrs, expected):
        param = torch.ones(4, dtype=dtype, device=device)
        grad = torch.ones(4, dtype=dtype, device=device)
        index = torch.arange(4, dtype=torch.int32, device=device)
        m, v = torch.zeros(4, device=device), torch.zeros(4, device=device)
        K.masked_adamw_(
            param,
            grad,
            m,
            v,
            index,
            step=1,
            lr=lr,
            beta1=0.9,
            beta2=0.999,
            eps=0.0,
            weight_decay=0.0,
            backend=backend,
        )
        assert param.float().tolist() == [want] * 4, (lr, param.float().tolist())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_entries_skipped_and_counted(backend, device, bad):
    param, grad, m, v, index = make_problem((4097,), torch.float32, device=device)
    poisoned = index[::7].long()  # every 7th selected entry gets a bad gradient
    grad.view(-1)[poisoned] = bad
    count = torch.zeros((), dtype=torch.int64, device=device)
    p_ref, m_ref, v_ref = param.clone(), m.clone(), v.clone()
    ref_count = torch.zeros((), dtype=torch.int64, device=device)
    R.masked_adamw_(p_ref, grad, m_ref, v_ref, index, step=2, **HP, nonfinite_count=ref_count)
    p0, m0, v0 = param.clone(), m.clone(), v.clone()
    K.masked_adamw_(param, grad, m, v, index, step=2, backend=backend, **HP, nonfinite_count=count)
    assert int(count) == int(ref_count) == poisoned.numel()
    assert torch.isfinite(param).all() and torch.isfinite(m).all() and torch.isfinite(v).all()
    skipped = torch.zeros(index.numel(), dtype=torch.bool, device=device)
    skipped[::7] = True
    assert torch.equal(param.view(-1)[poisoned], p0.view(-1)[poisoned])  # bitwise kept
    assert torch.equal(m[skipped], m0[skipped]) and torch.equal(v[skipped], v0[skipped])
    torch.testing.assert_close(param, p_ref, atol=1e-7, rtol=2e-6)
    torch.testing.assert_close(m, m_ref, atol=M_ATOL, rtol=1e-6)
    assert not torch.equal(m[~skipped], m0[~skipped])  # the others did step
    # grad_scale overflowing a finite gradient to inf counts as non-finite too
    big = torch.full((4,), 3e38, device=device)
    c2 = torch.zeros((), dtype=torch.int64, device=device)
    K.masked_adamw_(
        torch.ones(4, device=device),
        big,
        torch.zeros(4, device=device),
        torch.zeros(4, device=device),
        torch.arange(4, device=device),
        step=1,
        grad_scale=10.0,
        backend=backend,
        nonfinite_count=c2,
        **HP,
    )
    assert int(c2) == 4


def test_huge_finite_gradients_are_not_counted_as_nonfinite(backend, device):
    # Their sum overflows float32 (the PyTorch path's quick test), yet each entry is
    # finite: all must step, none be counted.
    grad = torch.full((64,), 3e38, device=device)
    param = torch.ones(64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    m, v = torch.zeros(64, device=device), torch.zeros(64, device=device)
    K.masked_adamw_(
        param,
        grad,
        m,
        v,
        torch.arange(64, device=device),
        step=1,
        backend=backend,
        nonfinite_count=count,
        **HP,
    )
    assert int(count) == 0
    assert bool((param < 1).all()) and torch.isfinite(m).all()


# --- 16-bit rounding and 8-bit moments -------------------------------------------------

STORAGE = [
    (dtype, rounding, bits)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for rounding in ("nearest", "kahan", "stochastic")
    for bits in (32, 8)
    if not (rounding == "kahan" and dtype == torch.float32)
]


def storage_problem(shape, dtype, rounding, bits, seed=0, device="cpu"):
    """param, index and the state tensors of a masked step; a 1-entry param is selected
    whole (the single-entry layer)."""
    from sau_kernels.moments8 import num_blocks

    gen = torch.Generator().manual_seed(seed)
    param = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    density = 1.0 if param.numel() == 1 else 0.4
    index = torch.nonzero(torch.rand(shape, generator=gen).view(-1) < density).view(-1).int()
    param, index = param.to(device), index.to(device)
    n = index.numel()
    state = {}
    if bits == 8:
        state["exp_avg"] = torch.full((n,), 127, dtype=torch.uint8)
        state["exp_avg_sq"] = torch.zeros(n, dtype=torch.uint8)
        state["exp_avg_scale"] = torch.zeros(num_blocks(n))
        state["exp_avg_sq_scale"] = torch.zeros(num_blocks(n))
    else:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros(n), torch.zeros(n)
    if rounding == "kahan":
        state["compensation"] = torch.zeros(n, dtype=torch.int8)
    return param, index, {k: v.to(device) for k, v in state.items()}


def run_storage(fn, shape, dtype, rounding, bits, steps=3, device="cpu", compact=False, **kw):
    param, index, state = storage_problem(shape, dtype, rounding, bits, device=device)
    gen = torch.Generator().manual_seed(7)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for t in range(1, steps + 1):
        grad = (torch.randn(param.shape, generator=gen) * 1e-3).to(dtype).to(device)
        if index.numel() > 2:
            grad.view(-1)[index[1].long()] = float("nan")  # skipped, every step
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        extra = {k: v for k, v in state.items() if k not in ("exp_avg", "exp_avg_sq")}
        if compact:  # the gradient at the index only, as SAUAdamW(compact_grads=True) keeps it
            grad, extra = grad.view(-1)[index.long()].clone(), dict(extra, compact_grad=True)
        fn(param, grad, exp_avg, exp_avg_sq, index, step=t, lr=1e-3, beta1=0.9, beta2=0.999,
           eps=1e-8, weight_decay=0.01, rounding=rounding, seed=3, offset=5,
           nonfinite_count=count, **extra, **kw)  # fmt: skip
    return param, state, count


@pytest.mark.parametrize("shape", [(0,), (1,), (63,), (37, 45), (4097,)])
@pytest.mark.parametrize("dtype,rounding,bits", STORAGE)
def test_storage_is_bitwise_the_reference(backend, device, dtype, rounding, bits, shape):
    """Every stored bit (param, codes, scales, compensation) equals the reference's on
    both backends; float32 moments with nearest rounding are the pre-existing path
    (covered above to rounding), so they are compared to tolerance here."""
    got = run_storage(K.masked_adamw_, shape, dtype, rounding, bits, device=device,
                      backend=backend)  # fmt: skip
    want = run_storage(R.masked_adamw_, shape, dtype, rounding, bits, device=device)
    assert int(got[2]) == int(want[2])
    fast_path = bits == 32 and (dtype == torch.float32 or rounding == "nearest")
    for key in want[1]:
        if fast_path:
            torch.testing.assert_close(got[1][key], want[1][key], atol=1e-9, rtol=1e-5)
        else:
            assert torch.equal(got[1][key], want[1][key]), key
    if fast_path:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol)
    else:
        assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding,bits", [("kahan", 32), ("kahan", 8), ("stochastic", 8)])
def test_skipped_entry_keeps_param_and_compensation(backend, device, dtype, rounding, bits):
    param, index, state = storage_problem((300,), dtype, rounding, bits, device=device)
    bad = index[1].long()
    before = param.view(-1)[bad].clone()
    comp_before = state["compensation"][1].clone() if rounding == "kahan" else None
    param2, state2, count = run_storage(K.masked_adamw_, (300,), dtype, rounding, bits,
                                        device=device, backend=backend)  # fmt: skip
    assert int(count) == 3  # one NaN entry, three steps
    assert torch.equal(param2.view(-1)[bad], before)
    if rounding == "kahan":
        assert torch.equal(state2["compensation"][1], comp_before)
    moved = (param2.view(-1)[index.long()] != param.view(-1)[index.long()]).sum()
    assert int(moved) > 0  # the other entries stepped


def test_eight_bit_moments_track_float32_moments():
    """Decoded 8-bit moments stay within a few map steps of float32 ones over 30 steps
    (stochastic coding: no drift), and the params within a fraction of the update."""
    from sau_kernels.moments8 import decode

    p32, s32, _ = run_storage(R.masked_adamw_, (2048,), torch.float32, "nearest", 32, steps=30)
    p8, s8, _ = run_storage(R.masked_adamw_, (2048,), torch.float32, "nearest", 8, steps=30)
    m8 = decode(s8["exp_avg"], s8["exp_avg_scale"], signed=True)
    v8 = decode(s8["exp_avg_sq"], s8["exp_avg_sq_scale"], signed=False) ** 2
    rel_m = float((m8 - s32["exp_avg"]).norm() / s32["exp_avg"].norm())
    rel_v = float((v8 - s32["exp_avg_sq"]).norm() / s32["exp_avg_sq"].norm())
    # Per-step coding noise: about 5% of a value (a map step of 12% / 6% for m / sqrt(v),
    # rounded stochastically), accumulated by the moving averages.
    assert rel_m < 0.15 and rel_v < 0.2, (rel_m, rel_v)
    # No drift: the mean of v is kept (a nearest code would freeze v at its first value).
    drift = float((v8 - s32["exp_avg_sq"]).mean() / s32["exp_avg_sq"].mean())
    assert abs(drift) < 0.02, drift
    p0 = storage_problem((2048,), torch.float32, "nearest", 32)[0]
    d32, d8 = p32 - p0, p8 - p0
    rel_p = float((d8 - d32).norm() / d32.norm())
    assert rel_p < 0.1, rel_p


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(rounding="up"), ValueError, "rounding must be one of"),
        (dict(rounding="kahan"), ValueError, "needs compensation"),
        (dict(rounding="kahan", compensation=torch.zeros(3, dtype=torch.int16)), TypeError,
         "compensation must be a torch.int8"),
        (dict(exp_avg_scale=torch.zeros(1)), ValueError, "go together"),
        (dict(seed=-1), ValueError, "seed must be an integer"),
        (dict(offset=1.5), ValueError, "offset must be an integer"),
    ],
)  # fmt: skip
def test_bad_storage_arguments(over, exc, match):
    param = torch.zeros(10, dtype=torch.bfloat16)
    index = torch.tensor([1, 2, 3], dtype=torch.int32)
    kwargs = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(exc, match=match):
        K.masked_adamw_(param, torch.ones(10), torch.zeros(3), torch.zeros(3), index,
                        **kwargs, **over)  # fmt: skip


def test_uint8_moments_need_their_scales():
    index = torch.tensor([1, 2], dtype=torch.int32)
    codes = torch.zeros(2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="need exp_avg_scale"):
        K.masked_adamw_(torch.zeros(4), torch.ones(4), codes, codes.clone(), index, step=1,
                        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="exp_avg_scale must have 1 entries"):
        K.masked_adamw_(torch.zeros(4), torch.ones(4), codes, codes.clone(), index, step=1,
                        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                        exp_avg_scale=torch.zeros(2), exp_avg_sq_scale=torch.zeros(2))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
def test_ties_in_the_stored_param(backend, device, dtype, rounding):
    """With eps = 0 the first step moves p by exactly lr (as in the nearest-even test
    above); lr = 1.5 spacings puts x on a midpoint. kahan stores the even neighbour and a
    code of 127 (the rest, +128 units, clamped); stochastic picks one of the two
    neighbours; both equal the reference bit for bit."""
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # spacing just below 1.0
    n = 512
    results = []
    for fn, kw in ((K.masked_adamw_, dict(backend=backend)), (R.masked_adamw_, {})):
        param = torch.ones(n, dtype=dtype, device=device)
        index = torch.arange(n, dtype=torch.int32, device=device)
        comp = torch.zeros(n, dtype=torch.int8, device=device) if rounding == "kahan" else None
        fn(param, torch.ones(n, dtype=dtype, device=device), torch.zeros(n, device=device),
           torch.zeros(n, device=device), index, step=1, lr=ulp * 1.5, beta1=0.9,
           beta2=0.999, eps=0.0, weight_decay=0.0, rounding=rounding, compensation=comp,
           **kw)  # fmt: skip
        results.append((param, comp))
    (param, comp), (ref_param, ref_comp) = results
    assert torch.equal(param, ref_param)
    if rounding == "kahan":
        assert torch.equal(param, torch.full_like(param, 1.0 - 2 * ulp))  # the even one
        assert torch.equal(comp, torch.full_like(comp, 127)) and torch.equal(comp, ref_comp)
    else:
        assert bool(((param == 1.0 - ulp) | (param == 1.0 - 2 * ulp)).all())
        assert 0.3 < float((param == 1.0 - ulp).float().mean()) < 0.7


@pytest.mark.parametrize("dtype,rounding,bits", STORAGE)
def test_compact_grad_is_bitwise_the_gathered_grad(backend, device, dtype, rounding, bits):
    """A grad holding only the index's entries gives the same bits as the full grad."""
    full = run_storage(K.masked_adamw_, (37, 45), dtype, rounding, bits, device=device,
                       backend=backend)  # fmt: skip
    compact = run_storage(K.masked_adamw_, (37, 45), dtype, rounding, bits, device=device,
                          compact=True, backend=backend)  # fmt: skip
    ref = run_storage(R.masked_adamw_, (37, 45), dtype, rounding, bits, device=device,
                      compact=True)  # fmt: skip
    assert torch.equal(full[0], compact[0]) and int(full[2]) == int(compact[2]) == 3
    for key in full[1]:
        assert torch.equal(full[1][key], compact[1][key]), key
    if not (bits == 32 and (dtype == torch.float32 or rounding == "nearest")):
        assert torch.equal(ref[0], compact[0])


def test_compact_grad_must_match_the_index():
    index = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="one entry per index entry"):
        K.masked_adamw_(torch.zeros(4), torch.ones(4), torch.zeros(2), torch.zeros(2), index,
                        step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                        compact_grad=True)  # fmt: skip
