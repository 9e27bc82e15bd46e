"""Problem builders shared by the CPU benchmarks and the GPU runner.

Layer sets are Llama-shaped decoder layers (q, k, v, o, gate, up, down), pruned to a
sparsity by a random mask (the kernels' cost does not depend on which entries survive),
with a selection planned by `sau.plan_selection` on random saliency.
"""

from __future__ import annotations

import torch


def llama_layer_shapes(
    hidden: int, intermediate: int, kv_hidden: int | None = None, n_layers: int = 1
) -> list[tuple[int, int]]:
    """(out, in) shapes of the 7 linear weights of `n_layers` Llama decoder layers."""
    kv = hidden if kv_hidden is None else kv_hidden
    one = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (intermediate, hidden),
        (intermediate, hidden),
        (hidden, intermediate),
    ]
    return one * n_layers


# Llama-3.1-8B: hidden 4096, 8 KV heads of 128 (1024), intermediate 14336.
LLAMA_8B = dict(hidden=4096, intermediate=14336, kv_hidden=1024)


def sparse_layers(shapes, *, sparsity=0.5, dtype=torch.float32, device="cpu", seed=0):
    """Params (pruned: exact zeros at a random `sparsity` fraction) and dense grads.

    Returns: (params, grads), lists of tensors of the given shapes and dtype.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    params, grads = [], []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        p[torch.rand(shape, generator=gen, device=device) < sparsity] = 0
        params.append(torch.nn.Parameter(p.to(dtype)))
        grads.append(torch.randn(shape, generator=gen, device=device).to(dtype))
    return params, grads


def plan_for(params, *, k=0.3, seed=1):
    """A SelectionPlan over `params` from random saliency (uniform cubed, like skewed Fisher)."""
    from sau.plan import plan_selection

    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    saliency = {
        f"layer{i}": torch.rand(p.shape, generator=gen, device=p.device) ** 3
        for i, p in enumerate(params)
    }
    named = [(f"layer{i}", p) for i, p in enumerate(params)]
    return plan_selection(named, saliency, k=k)


def attach_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def state_bytes_per_param(optimizer, params) -> float:
    """Bytes of optimizer state per parameter (counting every tensor in the state)."""
    total = 0
    for p in params:
        for value in optimizer.state[p].values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total / sum(p.numel() for p in params)
