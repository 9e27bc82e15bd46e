"""Weight-only round-to-nearest (RTN) quantization, done in memory as quantize-dequantize.

Scheme (the RTN baseline of GPTQ, Frantar et al., ICLR 2023, and AWQ, Lin et al., MLSys
2024, the form in which Zhang et al., ICLR 2025, "Catastrophic failure of LLM unlearning
via quantization", found 4-bit quantization restores unlearned knowledge):

- symmetric, per group of ``group_size`` (default 128) consecutive entries along the
  input dimension of each row of a Linear weight ``[out_features, in_features]``
  (a last, shorter group when ``in_features`` is not a multiple of it);
- ``qmax = 2**(bits - 1) - 1`` (127 at 8 bits, 7 at 4 bits);
  ``scale = max|w| over the group / qmax``; ``q = clamp(round(w / scale), -qmax, qmax)``;
  the weight is replaced by ``q * scale`` in its own dtype;
- zeros stay exactly zero (``round(0) = 0``), so a pruned model keeps its mask;
  an all-zero group stays all-zero.

NF4 (`nf4_quantize_dequantize`; Dettmers et al., NeurIPS 2023, QLoRA, as bitsandbytes'
`quantize_4bit(quant_type="nf4")` computes it): the weight is read as one flat array cut
into blocks of ``block_size`` (default 64) consecutive entries (a last, shorter block when
the size is not a multiple of it); ``absmax`` = max|w| over the block (float32); each
entry becomes the nearest of the 16 values of `NF4_CODE` to ``w * (1 / absmax)`` (decision
at the midpoints between adjacent values, a tie to the lower one) and is replaced by
``code * absmax``. The code holds an exact 0, so zeros (pruned weights) stay exactly
zero, and the largest entry of a block maps to exactly ``+-absmax``, so quantizing again
returns the same weight (idempotent).

The RTN scale is rounded to bfloat16 precision (8 significant bits), as deployed kernels
store 16-bit scales: then ``q * scale`` (<= 7 + 8 significant bits) is exact in float32,
the largest entry of every group maps back to exactly ``qmax * scale``, and quantizing an
already quantized float32 weight returns it unchanged (idempotent). The 8-bit error is at
most ``scale / 2 * (1 + 2**-8)``, about 0.4% of the group's max.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sau.prune import target_linear_names

__all__ = [
    "BITS",
    "NF4_BLOCK",
    "NF4_CODE",
    "nf4_codes",
    "nf4_quantize_dequantize",
    "quantize_dequantize",
    "quantize_model_",
]

BITS = (4, 8)
NF4_BLOCK = 64
# bitsandbytes' NF4 code (functional.get_4bit_type("nf4")), the published float32 values:
# quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0 (8 positive, 7 negative).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _check(bits: int, group_size: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def quantize_dequantize(weight: torch.Tensor, bits: int, *, group_size: int = 128) -> torch.Tensor:
    """Symmetric per-group RTN quantization of a 2-D weight, returned dequantized.

    Args:
        weight: [out_features, in_features], float32 / float16 / bfloat16 (any device).
        bits: 2..16; 8 and 4 are what the sweep reports.
        group_size: entries per group along the input (last) dimension.

    Returns:
        A new tensor, same shape, dtype and device: ``q * scale`` per group (see module
        docstring). Exact zeros of ``weight`` are exact zeros of the result.
    """
    _check(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")
    rows, cols = weight.shape
    if weight.numel() == 0:
        return weight.clone()
    qmax = float(2 ** (bits - 1) - 1)
    pad = (-cols) % group_size
    w = weight.detach().float()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))  # zero padding never raises a group's max
    g = w.view(rows, -1, group_size)
    scale = (g.abs().amax(dim=-1, keepdim=True) / qmax).to(torch.bfloat16).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: q = 0
    q = torch.clamp(torch.round(g / safe), -qmax, qmax)
    out = (q * scale).view(rows, -1)[:, :cols]
    return out.to(weight.dtype).contiguous()


def quantize_model_(
    model: torch.nn.Module,
    bits: int | str,
    *,
    group_size: int = 128,
    names: Iterable[str] | None = None,
) -> list[str]:
    """Quantize-dequantize the model's Linear weights in place.

    Args:
        model: any torch module.
        bits, group_size: as in `quantize_dequantize`; bits="nf4" quantizes to NF4
            instead (`nf4_quantize_dequantize`, block `NF4_BLOCK`; group_size unused).
        names: parameter names to quantize; default the decoder blocks' Linear weights
            (`sau.prune.target_linear_names`: what pruning and unlearning touch; the
            embeddings and LM head stay in full precision, as GPTQ/AWQ leave them).

    Returns:
        The names quantized, in order.
    """
    if bits != "nf4":
        _check(bits, group_size)
    if names is None:
        names = target_linear_names(model)
    names = list(names)
    with torch.no_grad():
        for name in names:
            p = model.get_parameter(name)
            if bits == "nf4":
                p.copy_(nf4_quantize_dequantize(p))
            else:
                p.copy_(quantize_dequantize(p, bits, group_size=group_size))
    return names


def _nf4_blocks(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as float32 blocks [n_blocks, block_size] (zero padded) and each
    block's absmax [n_blocks, 1]."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")
    flat = weight.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))  # zeros never raise a block's max
    blocks = flat.view(-1, block_size)
    return blocks, blocks.abs().amax(dim=-1, keepdim=True)


def nf4_codes(weight: torch.Tensor, *, block_size: int = NF4_BLOCK):
    """NF4 code indices and block absmax of a weight (the quantized form, not dequantized).

    Args:
        weight: any shape, float32 / float16 / bfloat16.
        block_size: entries per block of the flattened weight.

    Returns:
        (idx, absmax): idx int64 [n_blocks, block_size] in 0..15 (index into `NF4_CODE`;
        the padding of a last, shorter block is code 7, the 0), absmax float32
        [n_blocks, 1].
    """
    blocks, absmax = _nf4_blocks(weight, block_size)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=blocks.device)
    # As bitsandbytes: times the reciprocal (an all-zero block gives 0), clamped to [-1, 1].
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
    mids = (code[1:] + code[:-1]) / 2
    # Nearest code value: the number of midpoints strictly below (a tie goes down).
    idx = torch.bucketize(scaled, mids)
    return idx, absmax


def nf4_quantize_dequantize(weight: torch.Tensor, *, block_size: int = NF4_BLOCK) -> torch.Tensor:
    """NF4 block quantization of a weight, returned dequantized (see module docstring).

    Args:
        weight: any shape (2-D [out, in] for a Linear), float32 / float16 / bfloat16.
        block_size: entries per block of the flattened weight (bitsandbytes' default 64).

    Returns:
        A new tensor, same shape, dtype and device: ``NF4_CODE[idx] * absmax``. Exact zeros
        of ``weight`` are exact zeros of the result.
    """
    idx, absmax = nf4_codes(weight, block_size=block_size)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=idx.device)
    out = (code[idx] * absmax).reshape(-1)[: weight.numel()].view(weight.shape)
    return out.to(weight.dtype).contiguous()
