"""sau_kernels.rounding: the random stream, stochastic rounding, the compensation code."""

from __future__ import annotations

import math

import pytest
import torch

from sau_kernels.rounding import (
    compensation_unit,
    hash32,
    pack_compensation,
    random_bits,
    round_stochastic,
    stream_salt,
    unpack_compensation,
)

HALF = [torch.bfloat16, torch.float16]


def spacing(x: torch.Tensor, dtype) -> torch.Tensor:
    """The gap from |x| rounded toward zero in dtype to the next value away from zero."""
    lo = x.to(dtype)
    lo = torch.where(lo.float().abs() > x.abs(), torch.nextafter(lo, torch.zeros_like(lo)), lo)
    hi = torch.nextafter(lo, torch.where(x < 0, -torch.inf, torch.inf).to(dtype))
    return (hi.float() - lo.float()).abs()


def test_random_bits_are_uniform_and_depend_on_every_input():
    pos = torch.arange(200_000, dtype=torch.int64)
    bits = random_bits(pos, stream_salt(0, 1, 0))
    assert int(bits.min()) >= 0 and int(bits.max()) < 2**32
    u = bits.double() / 2**32
    # Mean and variance of U(0, 1) within 5 standard errors (n = 2e5).
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert abs(float(u.var()) - 1 / 12) < 5 * 0.0745 / math.sqrt(u.numel())
    # Each of the 32 bits is set about half of the time.
    for b in range(32):
        share = float(((bits >> b) & 1).double().mean())
        assert abs(share - 0.5) < 5 * 0.5 / math.sqrt(u.numel()), b
    for other in (stream_salt(1, 1, 0), stream_salt(0, 2, 0), stream_salt(0, 1, 1)):
        assert float((random_bits(pos, other) == bits).double().mean()) < 1e-3
    far = random_bits(pos + 2**33, stream_salt(0, 1, 0))  # the high word matters too
    assert float((far == bits).double().mean()) < 1e-3


def test_hash_is_a_function_of_its_input_only():
    x = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    assert torch.equal(hash32(x), hash32(x.clone()))
    assert len(set(hash32(x).tolist())) == 4


@pytest.mark.parametrize("dtype", HALF)
def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased(dtype):
    n = 100_000
    gen = torch.Generator().manual_seed(0)
    # One value per magnitude decade, repeated, so every entry draws its own bits.
    x = torch.tensor([0.0213, -0.37, 3.1e-5, -7e-7, 1.5e-8], dtype=torch.float32)
    x = x.repeat_interleave(n // 5)
    x = x * (1 + 1e-3 * torch.rand(x.shape, generator=gen))
    if dtype == torch.bfloat16:
        x = x[x.abs() > 1e-7]
    bits = random_bits(torch.arange(x.numel()), stream_salt(5, 1, 0))
    y = round_stochastic(x, bits, dtype)
    assert torch.equal(y.to(dtype).float(), y)  # representable
    gap = spacing(x, dtype)
    assert bool(((y - x).abs() <= gap).all())  # one of the two neighbours
    # Unbiased: the mean error in spacings is 0 within 5 standard errors.
    err = ((y - x) / gap).double()
    assert abs(float(err.mean())) < 5 * float(err.std()) / math.sqrt(err.numel())
    exact = x.to(dtype).float()
    assert torch.equal(round_stochastic(exact, bits, dtype), exact)  # exact values stay


@pytest.mark.parametrize("dtype", HALF)
def test_compensation_round_trips_to_sixteen_more_bits(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=gen) * 0.02
    p, code = pack_compensation(x, dtype)
    assert torch.equal(p.to(dtype).float(), p)
    assert torch.equal(p, x.to(dtype).float())  # the parameter is round-to-nearest
    back = unpack_compensation(p, code, dtype)
    unit = compensation_unit(p, dtype)
    # The rest, at most half a spacing (128 units), is kept to half a unit, except within
    # half a unit of the midpoint where the clamp to +-127 costs up to one unit.
    err = (back - x).abs() / unit
    assert float(err.max()) <= 1.0
    clamped = (x - p).abs() / unit > 127.5
    assert bool((err[~clamped] <= 0.5).all())
    assert int(code.abs().max()) <= 127


def test_compensation_unit_is_a_256th_of_the_spacing():
    p = torch.tensor([1.0, 0.02, -3.0, 2.0**-20], dtype=torch.float32)
    for dtype in HALF:
        q = p.to(dtype)
        step = (torch.nextafter(q, torch.full_like(q, torch.inf)).float() - q.float()).abs()
        assert torch.equal(compensation_unit(q.float(), dtype), step / 256)


@pytest.mark.parametrize("dtype", HALF)
def test_ties_round_to_even_and_split_evenly(dtype):
    """x exactly halfway between two 16-bit values: nearest (and kahan's p) takes the even
    one, kahan's code saturates at +-127 units (one unit short of the half spacing), and
    stochastic rounding goes either way with probability 1/2."""
    lo = torch.tensor([1.0, 0.015625, -0.25, 3.0]).to(dtype)
    hi = torch.nextafter(lo, torch.where(lo < 0, -torch.inf, torch.inf).to(dtype))
    mid = (lo.float() + hi.float()) / 2  # exact in float32
    p, code = pack_compensation(mid, dtype)
    assert torch.equal(p, mid.to(dtype).float())  # torch's nearest-even
    even = torch.where((lo.view(torch.int16) & 1) == 0, lo, hi).float()
    assert torch.equal(p, even)
    assert torch.equal(code.abs(), torch.full_like(code, 127))
    n = 20_000
    x = mid.repeat(n)
    y = round_stochastic(x, random_bits(torch.arange(x.numel()), stream_salt(1, 1, 0)), dtype)
    up = (y.view(n, -1) == hi.float()).double().mean(0)
    assert bool(((y.view(n, -1) == hi.float()) | (y.view(n, -1) == lo.float())).all())
    assert bool(((up - 0.5).abs() < 5 * 0.5 / math.sqrt(n)).all()), up
