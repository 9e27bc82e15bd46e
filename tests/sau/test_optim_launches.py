"""SAUAdamW.step launches the masked AdamW kernel O(1) times, whatever the layer and
expert count: every segment of every planned parameter of one dtype combination goes
into one multi-tensor launch (sau_kernels.adamw.masked_adamw_multi_); float32 dense
parameters step together through torch's foreach ops (dense_adamw_foreach_), bitwise
dense_adamw_ on each.

Launches are counted where Triton runs a kernel (the interpreted or compiled function's
`run`, wrapped for the one step), so a launch from any path of the step is counted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sau import SAUAdamW, optim, plan_selection
from sau.optim import dense_adamw_, dense_adamw_foreach_
from sau_kernels import adamw as A
from tests.helpers import triton_runnable

needs_triton = pytest.mark.skipif(
    not triton_runnable(), reason="needs triton with a CUDA device or TRITON_INTERPRET=1"
)
WIDTH = (6, 10)  # a tiny Linear weight: the count, not the work, is under test
EXPERT = (3, 8)  # one expert's matrix in a fused experts tensor


def pruned(shape, gen) -> torch.Tensor:
    """A random tensor with its smaller half set to exactly 0 (magnitude pruning)."""
    w = torch.randn(shape, generator=gen)
    w[w.abs() <= w.abs().median()] = 0
    return w


def model(n_layers: int, n_experts: int, dtypes) -> list[nn.Parameter]:
    """n_layers Linear weights, two fused experts tensors [n_experts, 3, 8] and a dense
    bias per layer; the planned tensors cycle through `dtypes`."""
    gen = torch.Generator().manual_seed(0)
    shapes = [WIDTH] * n_layers + [(n_experts, *EXPERT)] * 2
    planned = [
        nn.Parameter(pruned(s, gen).to(dtypes[i % len(dtypes)])) for i, s in enumerate(shapes)
    ]
    dense = [nn.Parameter(torch.randn(WIDTH[0], generator=gen)) for _ in range(n_layers)]
    return planned + dense


def step_launches(n_layers: int, n_experts: int, dtypes, **options) -> int:
    """Triton kernel launches of sau_kernels in the second SAUAdamW.step (the first one
    creates the state) on `model`."""
    params = model(n_layers, n_experts, dtypes)
    n_planned = n_layers + 2
    gen = torch.Generator().manual_seed(1)
    named = [(f"w{i}", p) for i, p in enumerate(params[:n_planned])]
    saliency = {n: torch.rand(p.shape, generator=gen) for n, p in named}
    plan = plan_selection(named, saliency, k=0.5, alpha=1.0)
    opt = SAUAdamW(params, plan=plan, lr=1e-2, backend="triton", **options)
    launches = []
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if step == 1:
            with counting(launches):
                opt.step()
        else:
            opt.step()
    return len(launches)


class counting:
    """Record every Triton launch of a sau_kernels kernel while inside the block."""

    def __init__(self, out: list):
        self.out = out
        self.cls = type(A._masked_adamw_multi_kernel)  # interpreted or compiled

    def __enter__(self):
        original, out = self.cls.run, self.out

        def run(kernel, *args, **kwargs):
            if kernel.fn.__module__.startswith("sau_kernels"):
                out.append(kernel.fn.__qualname__)
            return original(kernel, *args, **kwargs)

        self.original = original
        self.cls.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.original


@needs_triton
@pytest.mark.parametrize(
    "dtypes,options",
    [
        ((torch.float32,), {}),
        ((torch.bfloat16,), dict(rounding="kahan", state_bits=8, amplify="saliency")),
        ((torch.float32, torch.bfloat16), dict(rounding="stochastic", amplify="update")),
        ((torch.float32,), dict(compact_grads=True)),
    ],
    ids=["fp32", "bf16-kahan-8bit-saliency", "fp32+bf16-stochastic", "fp32-compact"],
)
def test_launches_per_step_do_not_grow_with_layers_or_experts(dtypes, options):
    small = step_launches(12, 4, dtypes, **options)
    large = step_launches(24, 8, dtypes, **options)
    # Per step before: one launch per non-empty segment (24 + 2 x 8 = 40 here).
    assert 1 <= large <= 3 * len(dtypes)
    assert small == large


@needs_triton
def test_the_counter_sees_every_launch():
    """The per-segment path (one masked_adamw_ per segment, as the step was before) counts
    one launch per non-empty segment: the counter is not blind to launches."""
    gen = torch.Generator().manual_seed(4)
    launches = []
    with counting(launches):
        for n in (5, 0, 3):
            param, grad = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
            index = torch.arange(n, dtype=torch.int32)
            m, v = torch.zeros(n), torch.zeros(n)
            A.masked_adamw_(param, grad, m, v, index, step=1, lr=1e-2, beta1=0.9, beta2=0.999,
                            eps=1e-8, weight_decay=0.0, backend="triton")  # fmt: skip
    assert launches == ["_masked_adamw_kernel"] * 2


def test_segments_are_gathered_once_not_every_step(monkeypatch, backend):
    """Each planned parameter's SegmentGroup is built at its first step and kept: later
    steps gather nothing (the host's work per step no longer grows with the experts),
    until load_state_dict drops what was kept."""
    params = model(3, 4, (torch.float32,))
    gen = torch.Generator().manual_seed(1)
    named = [(f"w{i}", p) for i, p in enumerate(params[:5])]
    plan = plan_selection(named, {n: torch.rand(p.shape, generator=gen) for n, p in named}, k=0.5)
    opt = SAUAdamW(params, plan=plan, lr=1e-2, backend=backend)
    built = []
    gather = optim.segment_group
    monkeypatch.setattr(optim, "segment_group", lambda segs: built.append(1) or gather(segs))
    per_step = []
    for step in range(4):
        if step == 3:
            opt.load_state_dict(opt.state_dict())
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        per_step.append(len(built))
        built.clear()
    assert per_step == [5, 0, 0, 5]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_foreach_is_bitwise_dense_adamw_on_each(monkeypatch, weight_decay):
    gen = torch.Generator().manual_seed(2)
    shapes, steps = [(7, 5), (1,), (300,), (0,)], [1, 5, 2, 3]
    params = [torch.randn(s, generator=gen) for s in shapes]
    moments = [(torch.randn(s, generator=gen) * 0.1, torch.rand(s, generator=gen)) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    grads[0][1, 2], grads[2][7] = float("nan"), float("-inf")
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
    one = [(p.clone(), m.clone(), v.clone(), torch.zeros((), dtype=torch.int64))
           for p, (m, v) in zip(params, moments)]  # fmt: skip
    many = [tuple(t.clone() for t in row) for row in one]
    for (p, m, v, count), g, t in zip(one, grads, steps):
        dense_adamw_(p, g, m, v, step=t, **hp, nonfinite_count=count)
    with monkeypatch.context() as mp:  # no value read on the host: no device sync
        for name in ("__bool__", "item", "__int__", "__float__", "tolist", "__index__"):
            mp.setattr(torch.Tensor, name, _forbidden)
        p, m, v, counts = ([row[i] for row in many] for i in range(4))
        dense_adamw_foreach_(p, grads, m, v, steps=steps, **hp, nonfinite_counts=counts)
    for a, b in zip(one, many):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert [int(row[3]) for row in many] == [1, 0, 1, 0]
    assert not torch.equal(many[0][0], params[0])  # it stepped


def _forbidden(self, *args, **kwargs):
    raise AssertionError("the dense step read a device value on the host")
