"""One optimizer step: SAUAdamW vs torch.optim.AdamW (foreach and for-loop) on a
Llama-shaped 50%-sparse layer set at hidden 1024 (12.6M params), k = 0.3."""

import pytest
import torch

from benchmarks.common import (
    attach_grads,
    llama_layer_shapes,
    plan_for,
    sparse_layers,
    state_bytes_per_param,
)
from sau.optim import SAUAdamW

SHAPES = llama_layer_shapes(hidden=1024, intermediate=2816)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["baseline-foreach", "baseline-forloop", "sau"])
def test_step(benchmark, impl, dtype):
    benchmark.group = f"step {str(dtype)[6:]} hidden=1024 sparsity=0.5 k=0.3"
    params, grads = sparse_layers(SHAPES, dtype=dtype)
    attach_grads(params, grads)
    if impl == "sau":
        opt = SAUAdamW(params, plan=plan_for(params, k=0.3), lr=1e-5, backend="torch")
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=impl == "baseline-foreach")
    opt.step()  # create state outside the timing
    benchmark.pedantic(opt.step, rounds=7, warmup_rounds=1)
    benchmark.extra_info["state_bytes_per_param"] = state_bytes_per_param(opt, params)
    benchmark.extra_info["n_params"] = sum(p.numel() for p in params)
