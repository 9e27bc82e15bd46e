"""accumulate_sq_grad_ (PyTorch path) vs acc.addcmul_(g, g) on a 16M-element tensor."""

import pytest
import torch

import sau_kernels as K

N = 1 << 24


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["baseline-addcmul", "sau"])
def test_accumulate(benchmark, impl, dtype):
    benchmark.group = f"accumulate {str(dtype)[6:]} n={N}"
    g = torch.randn(N).to(dtype)
    acc = torch.zeros(N)
    if impl == "sau":
        benchmark(lambda: K.accumulate_sq_grad_(acc, g, backend="torch"))
    elif dtype == torch.float32:
        benchmark(lambda: acc.addcmul_(g, g))
    else:
        benchmark(lambda: acc.addcmul_(g.float(), g.float()))
    benchmark.extra_info["bytes"] = N * (8 + g.element_size())
