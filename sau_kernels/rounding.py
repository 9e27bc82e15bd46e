"""Storing a float32 step into a 16-bit parameter: the random stream, stochastic rounding
and the compensation code.

Three ways to store x (the float32 result of a step) into a bfloat16/float16 parameter p
(docs/optimizer.md, "16-bit parameters"):

- "nearest": p = round-to-nearest-even(x). An update under half a spacing of p is lost.
- "stochastic": p = one of the two neighbours of x, the far one with probability equal to
  the distance in spacings, so E[p] = x. The random bits come from a counter-based hash of
  (seed, step, stream, global flat position): reproducible, the same on the Triton and
  PyTorch paths, and the same however FSDP2 shards the tensor.
- "kahan": p = nearest(x), plus one int8 code c per entry holding the rest of x in units
  of 2**-8 of p's spacing: x ~= p + c * unit(p). The next step starts from p + c * unit(p)
  instead of p, so the stored parameter tracks the float32 trajectory to 16 significant
  bits (the role of a Kahan compensation, in 1 byte instead of 2).

Both the PyTorch functions here and the @triton.jit helpers (used by the masked AdamW
kernel) compute exactly the same bits; tests compare them bitwise.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None

__all__ = [
    "ROUNDINGS",
    "STREAM_EXP_AVG",
    "STREAM_EXP_AVG_SQ",
    "STREAM_PARAM",
    "compensation_unit",
    "hash32",
    "random_bits",
    "round_stochastic",
    "stream_salt",
    "unpack_compensation",
    "pack_compensation",
]

ROUNDINGS = ("kahan", "stochastic", "nearest")
# One stream per use, so the parameter's rounding and the two moments' code rounding
# (sau_kernels.moments8) draw independent bits at the same position and step.
STREAM_PARAM, STREAM_EXP_AVG, STREAM_EXP_AVG_SQ = 0, 1, 2

_MASK32 = 0xFFFFFFFF
# Multipliers below 2**31: a 32-bit value times one stays below 2**63, so the hash runs
# in int64 on every backend without signed overflow.
_K1 = 0x7FEB352D
_K2 = 0x5BD1E995
# 1.5 * 2**23: (y + R) - R rounds a float32 |y| < 2**22 to the nearest integer, ties to
# even, with plain IEEE adds on both backends.
_RINT = 12582912.0
# Per 16-bit format: (smallest float32 biased exponent used, exponent shift) so that
# unit(p) = 2 ** (max(E, e_min) - shift - 127) = 2**-8 of p's spacing.
_UNIT = {torch.bfloat16: (16, 15), torch.float16: (113, 18)}


def _hash32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _K1) & _MASK32
    x ^= x >> 15
    x = (x * _K2) & _MASK32
    return x ^ (x >> 16)


def stream_salt(seed: int, step: int, stream: int) -> int:
    """The 32-bit salt of one (seed, step, stream): every random bit of that step's stream
    is hash32(low32(pos) ^ hash32(high32(pos) ^ salt)) at global flat position pos."""
    h = _hash32_int(seed & _MASK32)
    h = _hash32_int(h ^ ((seed >> 32) & _MASK32))
    h = _hash32_int(h ^ (step & _MASK32))
    return _hash32_int(h ^ stream)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2**32), in int64 (no overflow)."""
    return _hash32_(x.clone())


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """hash32 in place on an int64 tensor the caller owns, with one temporary for every
    shift: the same bits, a third of the allocations (on a CPU each fresh buffer of a
    large step is page-faulted in, which costs as much as the arithmetic)."""
    t = x >> 16
    x ^= t
    x.mul_(_K1).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 15, out=t)
    x ^= t
    x.mul_(_K2).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 16, out=t)
    x ^= t
    return x


def random_bits(positions: torch.Tensor, salt: int) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) per global flat position (int64 tensor >= 0)."""
    if positions.device.type == "cpu" and (positions.numel() == 0 or positions.max() < 2**32):
        # Every high word is 0: its hash is one number, not a pass over the positions.
        return _hash32_(positions ^ _hash32_int(salt))
    high = _hash32_(((positions >> 32) & _MASK32) ^ salt)
    return _hash32_((positions & _MASK32) ^ high)


def _bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """int64 holding a float32 bit pattern in [0, 2**32) -> that float32."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _float_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> its bit pattern as int64 in [0, 2**32)."""
    return x.view(torch.int32).long() & _MASK32


def round_stochastic(x: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unbiased stochastic rounding of finite float32 x to bfloat16/float16 (float32 out,
    exactly representable in dtype).

    bfloat16 (and float16 normals, |x| >= 2**-14): add the low 16 (13) random bits to x's
    bit pattern and truncate them, which moves x to the neighbour away from zero with
    probability equal to its distance in spacings. float16 subnormals: on the fixed grid
    of 2**-24, up with probability frac(x * 2**24), from 24 random bits.
    """
    drop = 16 if dtype == torch.bfloat16 else 13
    low = (1 << drop) - 1
    b = (_float_bits(x) + (bits & low)) & (_MASK32 ^ low)
    out = _bits_to_float(b)
    if dtype == torch.float16:
        scaled = x * 2.0**24
        whole = torch.floor(scaled)
        up = ((bits >> 8).to(torch.float32) * 2.0**-24) < (scaled - whole)
        tiny = (whole + up.to(torch.float32)) * 2.0**-24
        out = torch.where(x.abs() < 2.0**-14, tiny, out)
    return out


def compensation_unit(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**-8 of the spacing of the 16-bit value p (float32 holding a dtype value), as a
    float32 power of two; floored at 2**-126 (bfloat16) or 2**-32 (float16) near zero."""
    e_min, shift = _UNIT[dtype]
    # In int32 and in place: the biased exponent (sign masked off) stays in [1, 255], so
    # shifting it back by 23 cannot reach the sign bit; half the traffic of int64.
    exponent = p.view(torch.int32) >> 23
    exponent.bitwise_and_(0xFF).clamp_(min=e_min).sub_(shift).bitwise_left_shift_(23)
    return exponent.view(torch.float32)


def unpack_compensation(p: torch.Tensor, code: torch.Tensor, dtype) -> torch.Tensor:
    """The float32 value a 16-bit p and its int8 code stand for: p + code * unit(p)
    (exact: both fit in float32's 24 bits)."""
    return p + code.to(torch.float32) * compensation_unit(p, dtype)


def pack_compensation(x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x -> (p, code): p = x rounded to nearest in dtype (float32 holding it) and
    code = the rest, round((x - p) / unit(p)) clamped to [-127, 127], as int8."""
    p = x.to(dtype).to(torch.float32)
    rest = (x - p) / compensation_unit(p, dtype)  # exact: a power-of-two divisor
    code = torch.clamp((rest + _RINT) - _RINT, -127.0, 127.0)
    return p, code.to(torch.int8)


if triton is not None:

    @triton.jit
    def hash32_tl(x):
        """hash32 on int64 values in [0, 2**32): the same bits as the PyTorch one."""
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x5BD1E995) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def random_bits_tl(positions, salt):
        """random_bits for int64 positions and an int64 salt."""
        high = hash32_tl(((positions >> 32) & 0xFFFFFFFF) ^ salt)
        return hash32_tl((positions & 0xFFFFFFFF) ^ high)

    @triton.jit
    def float_bits_tl(x):
        """float32 -> its bit pattern as int64 in [0, 2**32)."""
        return x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF

    @triton.jit
    def round_stochastic_tl(x, bits, IS_BF16: tl.constexpr):
        """round_stochastic: float32 x -> float32 holding a bf16/fp16 value."""
        if IS_BF16:
            b = (float_bits_tl(x) + (bits & 0xFFFF)) & 0xFFFF0000
            out = b.to(tl.int32).to(tl.float32, bitcast=True)
        else:
            b = (float_bits_tl(x) + (bits & 0x1FFF)) & 0xFFFFE000
            out = b.to(tl.int32).to(tl.float32, bitcast=True)
            scaled = x * 16777216.0
            whole = tl.floor(scaled)
            u = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
            tiny = (whole + (u < (scaled - whole)).to(tl.float32)) * 5.9604644775390625e-08
            out = tl.where(tl.abs(x) < 6.103515625e-05, tiny, out)  # 2**-14
        return out

    @triton.jit
    def compensation_unit_tl(p, IS_BF16: tl.constexpr):
        """compensation_unit of float32 p holding a bf16/fp16 value."""
        exponent = (float_bits_tl(p) >> 23) & 0xFF
        if IS_BF16:
            exponent = tl.maximum(exponent, 16) - 15
        else:
            exponent = tl.maximum(exponent, 113) - 18
        return (exponent << 23).to(tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def round_nearest_tl(x, IS_BF16: tl.constexpr):
        """float32 -> float32 holding x rounded to nearest even in bf16 / fp16.

        bf16 on the bits: the CPU interpreter's plain .to(bfloat16) truncates, the GPU
        rounds to nearest; by hand both agree with torch. Finite x only."""
        if IS_BF16:
            bits = x.to(tl.int32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            out = (bits & -65536).to(tl.float32, bitcast=True)
        else:
            out = x.to(tl.float16).to(tl.float32)
        return out

    @triton.jit
    def pack_compensation_tl(x, IS_BF16: tl.constexpr):
        """pack_compensation: float32 x -> (float32 holding p, int8 code)."""
        p = round_nearest_tl(x, IS_BF16)
        rest = tl.div_rn(x - p, compensation_unit_tl(p, IS_BF16))
        code = (rest + 12582912.0) - 12582912.0
        code = tl.minimum(tl.maximum(code, -127.0), 127.0)
        return p, code.to(tl.int8)
