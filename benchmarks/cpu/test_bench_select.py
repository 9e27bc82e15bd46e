"""select_topk vs torch.topk / torch.kthvalue / torch.quantile on one 50%-sparse layer."""

import pytest
import torch

import sau_kernels as K
from sau_kernels._common import num_selected

SHAPE = (5632, 2048)  # a Llama MLP weight at hidden 2048: 11.5M elements
K_FRAC = 0.3


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=gen)
    w[torch.rand(SHAPE, generator=gen) < 0.5] = 0
    s = torch.rand(SHAPE, generator=gen) ** 3
    return s, w


@pytest.mark.parametrize("impl", ["baseline-topk", "baseline-kthvalue", "baseline-quantile", "sau"])
def test_select(benchmark, layer, impl):
    benchmark.group = f"select_topk {SHAPE[0]}x{SHAPE[1]} k={K_FRAC}"
    s, w = layer
    survivors = w != 0
    r = num_selected(K_FRAC, int(survivors.sum()))

    # Each baseline finds tau and the selected index, as a user would without SAU.
    def topk():
        vals = s[survivors]
        tau = torch.topk(vals, r, sorted=False).values.min()
        return torch.nonzero(survivors & (s >= tau))

    def kthvalue():
        vals = s[survivors]
        tau = torch.kthvalue(vals, vals.numel() - r + 1).values
        return torch.nonzero(survivors & (s >= tau))

    def quantile():
        vals = s[survivors]
        # quantile interpolates: not exact, shown only for speed (and refuses > 16.7M)
        tau = torch.quantile(vals, 1 - K_FRAC)
        return torch.nonzero(survivors & (s >= tau))

    fn = {
        "baseline-topk": topk,
        "baseline-kthvalue": kthvalue,
        "baseline-quantile": quantile,
        "sau": lambda: K.select_topk(s, w, K_FRAC, backend="torch"),
    }[impl]
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
