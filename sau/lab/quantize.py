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

The scale is rounded to bfloat16 precision (8 significant bits), as deployed kernels
store 16-bit scales: then ``q * scale`` (<= 7 + 8 significant bits) is exact in float32,
the largest entry of every group maps back to exactly ``qmax * scale``, and quantizing an
already quantized float32 weight returns it unchanged (idempotent). The 8-bit error is at
most ``scale / 2 * (1 + 2**-8)``, about 0.4% of the group's max.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sau.prune import target_linear_names

__all__ = ["BITS", "quantize_dequantize", "quantize_model_"]

BITS = (4, 8)


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
    bits: int,
    *,
    group_size: int = 128,
    names: Iterable[str] | None = None,
) -> list[str]:
    """Quantize-dequantize the model's Linear weights in place.

    Args:
        model: any torch module.
        bits, group_size: as in `quantize_dequantize`.
        names: parameter names to quantize; default the decoder blocks' Linear weights
            (`sau.prune.target_linear_names`: what pruning and unlearning touch; the
            embeddings and LM head stay in full precision, as GPTQ/AWQ leave them).

    Returns:
        The names quantized, in order.
    """
    _check(bits, group_size)
    if names is None:
        names = target_linear_names(model)
    names = list(names)
    with torch.no_grad():
        for name in names:
            p = model.get_parameter(name)
            p.copy_(quantize_dequantize(p, bits, group_size=group_size))
    return names
