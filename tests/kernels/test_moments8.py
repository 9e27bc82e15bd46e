"""sau_kernels.moments8: the code maps, block scales and stochastic coding."""

from __future__ import annotations

import math

import torch

from sau_kernels.moments8 import BLOCK, ZERO_CODE, code_map, decode, encode, num_blocks
from sau_kernels.rounding import random_bits, stream_salt


def bits_for(n: int, step: int = 1) -> torch.Tensor:
    return random_bits(torch.arange(n), stream_salt(0, step, 1))


def test_maps_are_ascending_and_span_the_stated_range():
    signed, unsigned = code_map(True), code_map(False)
    assert signed.numel() == 255 and unsigned.numel() == 256
    assert bool((signed[1:] > signed[:-1]).all()) and bool((unsigned[1:] > unsigned[:-1]).all())
    assert float(signed[ZERO_CODE]) == 0.0 and float(signed[-1]) == 1.0 == -float(signed[0])
    assert float(unsigned[-1]) == 1.0 and float(unsigned[0]) > 0  # no zero: see the module
    assert math.isclose(float(signed[ZERO_CODE + 1]), 2 ** (-126 / 6), rel_tol=1e-6)
    assert math.isclose(float(unsigned[0]), 2 ** (-255 / 16), rel_tol=1e-6)


def test_blocks_scale_independently_and_the_largest_entry_is_exact():
    n = 2 * BLOCK + 7  # two full blocks and a short one
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen)
    x[:BLOCK] *= 1e-4  # a block of tiny values keeps its own precision
    codes, scales = encode(x, bits_for(n), signed=True)
    assert codes.dtype == torch.uint8 and scales.numel() == num_blocks(n) == 3
    for b in range(3):
        part = x[b * BLOCK : (b + 1) * BLOCK]
        assert float(scales[b]) == float(part.abs().max())
    back = decode(codes, scales, signed=True)
    top = x.abs().view(-1)[: 2 * BLOCK].view(2, BLOCK).argmax(1) + torch.tensor([0, BLOCK])
    assert torch.equal(back[top], x[top])
    # Stochastic coding lands on one of the two neighbouring map values: within one map
    # step, a ratio of 2**(1/6) between neighbours, of the value (or of the smallest code).
    floor = scales.repeat_interleave(BLOCK)[:n] * 2 ** (-126 / 6)
    assert bool(((back - x).abs() <= (2 ** (1 / 6) - 1) * x.abs() + floor).all())


def test_coding_is_unbiased():
    n = 200 * BLOCK
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(n, generator=gen) * 0.7 + 0.01
    x[::BLOCK] = 1.0  # every block's scale is 1
    errors = []
    for signed in (True, False):
        codes, scales = encode(x, bits_for(n), signed=signed)
        back = decode(codes, scales, signed=signed)
        err = (back - x).double()
        errors.append(err)
        assert abs(float(err.mean())) < 5 * float(err.std()) / math.sqrt(n)
    assert not torch.equal(errors[0], torch.zeros_like(errors[0]))


def test_zeros_and_values_below_the_map():
    codes, scales = encode(torch.zeros(5), bits_for(5), signed=True)
    assert torch.equal(codes, torch.full((5,), ZERO_CODE, dtype=torch.uint8))
    assert torch.equal(decode(codes, scales, signed=True), torch.zeros(5))
    # An all-zero block of the unsigned map: scale 0, so it decodes to 0 exactly.
    codes, scales = encode(torch.zeros(3), bits_for(3), signed=False)
    assert float(scales[0]) == 0 and torch.equal(
        decode(codes, scales, signed=False), torch.zeros(3)
    )
    # A value far below the unsigned map's smallest code decodes to that code (never 0).
    x = torch.tensor([1.0, 1e-12])
    codes, scales = encode(x, bits_for(2), signed=False)
    assert int(codes[1]) == 0 and float(decode(codes, scales, signed=False)[1]) > 0


def test_zero_size():
    codes, scales = encode(torch.zeros(0), bits_for(0), signed=True)
    assert codes.numel() == 0 and scales.numel() == 0
