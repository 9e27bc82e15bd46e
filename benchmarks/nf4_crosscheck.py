"""Cross-check sau.lab.quantize's NF4 against bitsandbytes (not a dependency of SAU).

Run with an environment that has bitsandbytes, e.g. a throwaway venv:
    python -m benchmarks.nf4_crosscheck
Prints, per shape and dtype, the max |ours - bitsandbytes| of the dequantized weights.
"""

from __future__ import annotations

import torch

from sau.lab.quantize import NF4_CODE, nf4_quantize_dequantize


def main() -> None:
    """Compare on random float32 weights (normal, pruned, heavy-tailed)."""
    import bitsandbytes.functional as bnbf  # only here: not a runtime dependency

    code = bnbf.get_4bit_type("nf4", device="cpu")
    print("codebook max diff:", (code - torch.tensor(NF4_CODE)).abs().max().item())
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in [(64, 64), (128, 384), (7, 320), (256, 1024)]:
        for kind in ("normal", "pruned", "cauchy"):
            w = torch.randn(shape, generator=gen) * 0.05
            if kind == "pruned":
                w[torch.rand(shape, generator=gen) < 0.5] = 0
            if kind == "cauchy":
                w = w / torch.rand(shape, generator=gen).clamp_min(1e-3)
            q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
            ref = bnbf.dequantize_4bit(q, st)
            ours = nf4_quantize_dequantize(w)
            d = (ours - ref).abs().max().item()
            n = int((ours != ref).sum())
            worst = max(worst, d)
            print(f"{shape} {kind}: max|diff| {d:.3g}, entries differing {n}/{w.numel()}")
    print("worst max|diff|:", worst)


if __name__ == "__main__":
    main()
