"""8-bit moments: block-scaled codes for AdamW's exp_avg and exp_avg_sq.

A moment vector of n entries is stored as n uint8 codes plus one float32 scale per block
of BLOCK consecutive entries (the last block may be short): 1 + 4/BLOCK bytes per entry
instead of 4. Entry j of block b stands for

    exp_avg:     SIGNED_MAP[code_j] * scale_b           (scale_b = max |m| over the block)
    exp_avg_sq: (UNSIGNED_MAP[code_j] * scale_b) ** 2   (scale_b = max sqrt(v) over the block)

The second moment is coded through its square root: sqrt(v) spans the range of |m|
rather than its square. The unsigned map has no zero: a tiny sqrt(v) never decodes to 0
(it decodes to at least 2**-15.9 of the block's largest), so m / (sqrt(v) + eps) cannot
blow up.

Codes are picked by stochastic rounding between the two neighbouring map values (random
bits from sau_kernels.rounding's counter-based stream): the decoded moment is unbiased,
and a moment whose per-step change is smaller than a map spacing (beta2 = 0.999 changes v
by 0.1% per step) still moves on average instead of sticking at its code.

The maps are geometric: SIGNED_MAP holds 0 and +-2**(-i/6) for i = 0..126 (255 codes,
code 127 is 0; code 255 is unused), UNSIGNED_MAP holds 2**(-i/16) for i = 0..255. The
finer step of the second map is what the error of the step depends on most (measured:
benchmarks/bf16_rounding.py; docs/optimizer.md).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None

__all__ = [
    "BLOCK",
    "STATE_BITS",
    "ZERO_CODE",
    "code_map",
    "decode",
    "encode",
    "num_blocks",
]

STATE_BITS = (32, 8)
BLOCK = 256  # entries per scale; the Triton kernel's tile rows are one block each
ZERO_CODE = 127  # SIGNED_MAP[127] == 0: a fresh exp_avg


def num_blocks(n: int) -> int:
    """Scales needed for n entries: ceil(n / BLOCK)."""
    return -(-n // BLOCK)


@functools.cache
def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    magnitudes = [2.0 ** (-i / 6) for i in range(127)]
    signed = sorted([-m for m in magnitudes] + [0.0] + magnitudes)
    unsigned = sorted(2.0 ** (-i / 16) for i in range(256))
    return (
        torch.tensor(signed, dtype=torch.float64).float(),
        torch.tensor(unsigned, dtype=torch.float64).float(),
    )


def code_map(signed: bool, device=None) -> torch.Tensor:
    """The ascending float32 map of codes: SIGNED_MAP (255 values, for exp_avg) when
    signed, else UNSIGNED_MAP (256 values, for sqrt(exp_avg_sq)). Read-only: one copy
    per device is kept, so a step does not copy it to the GPU again."""
    return _map_on(signed, torch.device("cpu") if device is None else torch.device(device))


@functools.cache
def _map_on(signed: bool, device: torch.device) -> torch.Tensor:
    return _maps()[0 if signed else 1].to(device)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x (1-D, n entries) as [num_blocks, BLOCK], zero-padded."""
    pad = num_blocks(x.numel()) * BLOCK - x.numel()
    return torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK)


def decode(codes: torch.Tensor, scales: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """float32 values of n codes (uint8 [n]) with their block scales (float32
    [num_blocks(n)]): map[code] * scale; the caller squares it for exp_avg_sq."""
    table = code_map(signed, codes.device)
    n = codes.numel()
    per_entry = scales.repeat_interleave(BLOCK)[:n]
    return table[codes.long()] * per_entry


def encode(
    x: torch.Tensor, bits: torch.Tensor, *, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and block scales of float32 x [n] (finite; >= 0 when not signed).

    scale_b = max |x| over block b; each entry x / scale_b (0 when the scale is 0) is
    rounded stochastically to one of the two neighbouring map values, the upper one when
    the low 24 of its random bits (int64 [n], sau_kernels.rounding.random_bits) scaled
    to [0, 1) fall below its distance from the lower in map spacings. Returns (uint8 [n],
    float32 [num_blocks(n)]).
    """
    n = x.numel()
    table = code_map(signed, x.device)
    scales = _blocks(x.abs()).amax(dim=1)
    per_entry = scales.repeat_interleave(BLOCK)[:n]
    safe = torch.where(per_entry > 0, per_entry, torch.ones_like(per_entry))
    y = torch.where(per_entry > 0, x / safe, torch.zeros_like(x))
    # Lower neighbour: the last map value <= y (the first when y is below the map).
    lo = (torch.searchsorted(table, y, right=True) - 1).clamp(0, table.numel() - 2)
    t_lo, t_hi = table[lo], table[lo + 1]
    frac = ((y - t_lo) / (t_hi - t_lo)).clamp(0.0, 1.0)
    u = (bits >> 8).to(torch.float32) * 2.0**-24
    codes = lo + (u < frac).long()
    return codes.to(torch.uint8), scales


if triton is not None:

    @triton.jit
    def decode_tl(codes, scale, map_ptr):
        """map[codes] * scale (codes any int tile, scale broadcastable float32)."""
        return tl.load(map_ptr + codes.to(tl.int32)) * scale

    @triton.jit
    def encode_tl(x, scale, bits, map_ptr, MAP_SIZE: tl.constexpr):
        """encode for one tile of rows = blocks: x float32 [R, BLOCK], scale [R, 1]
        (that row's max |x|), bits int64 [R, BLOCK]. Returns int32 codes.

        The lower neighbour by binary search over the map (8 halvings for <= 256
        entries): the count of map values <= y, as torch.searchsorted(right=True).
        """
        y = tl.where(scale > 0, tl.div_rn(x, tl.where(scale > 0, scale, 1.0)), 0.0)
        count = tl.zeros(x.shape, dtype=tl.int32)
        for shift in tl.static_range(7, -1, -1):
            cand = count + (1 << shift)
            ok = cand <= MAP_SIZE
            value = tl.load(map_ptr + (cand - 1), mask=ok, other=float("inf"))
            count = tl.where(ok & (value <= y), cand, count)
        lo = tl.minimum(tl.maximum(count - 1, 0), MAP_SIZE - 2)
        t_lo = tl.load(map_ptr + lo)
        t_hi = tl.load(map_ptr + lo + 1)
        frac = tl.div_rn(y - t_lo, t_hi - t_lo)
        frac = tl.minimum(tl.maximum(frac, 0.0), 1.0)
        u = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
        return lo + (u < frac).to(tl.int32)
