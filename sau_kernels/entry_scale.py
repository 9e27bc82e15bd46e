"""Per-entry update scales stored in one byte: c_i = w_max ** ((code_i - 127) / 127).

amplify="saliency" (docs/method.md) scales each selected entry's AdamW update by
c_i = clamp(s_i / mean_{j in G} s_j, 1 / w_max, w_max). Adam's m / sqrt(v) gives every
entry of G a step of about lr whatever its saliency; a per-entry scale of the *update* is
not cancelled by the normalisation, so it is the form in which the saliency can shape the
step.

Storage: log-uniform uint8 codes over [1 / w_max, w_max]. Code 127 is exactly 1, codes 0
and 254 are the clamps, 255 is never written. For w_max = 10 one code step is a factor
10 ** (1 / 127) = 1.018, so a stored scale is within 0.9% of the exact ratio. One byte per
selected entry keeps the optimizer state at 13 bytes per entry of G (1.95 bytes per
parameter at 50% sparsity and k = 0.3, under the project's 2-byte target); a float32 scale
would make it 2.4.

Both backends decode with the same float32 formula, exp2(log2(w_max) * (code - 127) / 127):
the Triton kernel inline, the PyTorch path through `decode_entry_scale`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sau_kernels._common import check_float

CODE_ONE = 127  # the code of c = 1; codes run 0..254 (2 * CODE_ONE)


def encode_entry_scale(saliency_selected: torch.Tensor, mean: float, w_max: float) -> torch.Tensor:
    """uint8 codes of c_i = clamp(s_i / mean, 1 / w_max, w_max), rounded in log space.

    Args:
        saliency_selected: float32, 1-D, the (forget) saliency s_i of each entry of G, in
            index order; finite and >= 0.
        mean: mean_{j in G} s_j (I_G / |G|); <= 0 gives code 127 (c = 1) everywhere.
        w_max: clamp bound, finite and >= 1 (w_max = 1 gives c = 1 everywhere).
    Returns:
        uint8 tensor of codes, same shape and device as saliency_selected.
    """
    check_float("saliency_selected", saliency_selected, (torch.float32,))
    if not math.isfinite(w_max) or w_max < 1:
        raise ValueError(f"w_max must be a finite number >= 1, got {w_max!r}")
    if mean <= 0 or w_max == 1 or saliency_selected.numel() == 0:
        return torch.full_like(saliency_selected, CODE_ONE, dtype=torch.uint8)
    # log_{w_max}(s / mean) in [-1, 1] after the clamp; s == 0 maps to -inf -> code 0.
    # code = round(clamp(log(s / mean) / log(w_max), -1, 1) * 127) + 127, in place on one
    # float64 copy. On the CPU every step but the log runs in numpy: division, clamp,
    # product, round-half-to-even and sum are correctly rounded in both libraries, so the
    # codes are torch's bit for bit, with one torch operation (a parallel region, slow on
    # a loaded CPU: docs/benchmarks.md, "Planning speed") instead of nine.
    if saliency_selected.device.type == "cpu":
        x = saliency_selected.detach().reshape(-1).numpy().astype(np.float64) / mean
        torch.from_numpy(x).log_()  # torch's log, as on every other device
        x /= math.log(w_max)
        np.clip(x, -1.0, 1.0, out=x)
        x *= CODE_ONE
        np.rint(x, out=x)
        x += CODE_ONE
        return torch.from_numpy(x.astype(np.uint8)).reshape(saliency_selected.shape)
    code = saliency_selected.double().div_(mean).log_().div_(math.log(w_max))
    code = code.clamp_(-1.0, 1.0).mul_(CODE_ONE).round_().add_(CODE_ONE)
    return code.to(torch.uint8)


def decode_entry_scale(code: torch.Tensor, w_max: float) -> torch.Tensor:
    """float32 c_i = exp2(log2(w_max) * (code_i - 127) / 127), as the kernels compute it.

    Args:
        code: uint8 codes (encode_entry_scale's output), any shape.
        w_max: the bound the codes were made with.
    Returns:
        float32 tensor shaped like code.
    """
    log2_max = torch.tensor(math.log2(w_max), dtype=torch.float32, device=code.device)
    return torch.exp2(log2_max * ((code.float() - CODE_ONE) / CODE_ONE))
