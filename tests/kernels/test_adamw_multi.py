"""masked_adamw_multi_ and its grouped core (SegmentGroups kept across steps): bitwise
the per-segment masked_adamw_ calls, on both backends.

Every case steps several tensors (a fused experts tensor with a zero-size, a one-entry
and a multi-block segment, a non-power-of-two matrix with a shard offset, a fully
selected vector, a one-entry tensor), of float32 and bfloat16 together, for three steps
from two different step counts, with NaN/inf gradient entries in the second step, and
compares every param, moment, compensation code, 8-bit code and scale and non-finite
count with the same steps taken one masked_adamw_ call per segment.
"""

from __future__ import annotations

import pytest
import torch

from sau_kernels import adamw as A
from sau_kernels import masked_adamw_, masked_adamw_multi_
from sau_kernels.moments8 import num_blocks

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
# (rounding, state_bits, amplify, compact_grad): each switch of the kernel at least once.
CASES = [
    ("nearest", 32, "update", False),
    ("nearest", 32, "grad", True),
    ("kahan", 32, "grad", False),
    ("stochastic", 32, "saliency", True),
    ("kahan", 8, "update", True),
    ("stochastic", 8, "grad", False),
    ("nearest", 8, "saliency", False),
]
# name: (shape, entries selected per segment, shard offset, steps taken before)
TENSORS = {
    "experts": ((3, 20, 30), (0, 1, 333), 0, 0),
    "matrix": ((37, 45), (517,), 1000, 0),
    "vector": ((63,), (63,), 0, 4),
    "single": ((1,), (1,), 0, 4),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so NaN compares equal to the same NaN)."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width)


def make_tensor(name, dtype, case, gen) -> dict:
    """One tensor's param, its segments' index and state, NaN where nothing may write."""
    rounding, state_bits, amplify, compact = case
    shape, counts, offset, before = TENSORS[name]
    param = torch.randn(shape, generator=gen).to(dtype)
    per_segment = param.numel() // len(counts)
    parts = []
    for s, count in enumerate(counts):
        chosen = torch.randperm(per_segment, generator=gen)[:count].sort().values
        parts.append(chosen + s * per_segment)
    index = torch.cat(parts).to(torch.int32)
    n = index.numel()
    unselected = torch.ones(param.numel(), dtype=torch.bool)
    unselected[index.long()] = False
    param.view(-1)[unselected] = float("nan")  # poisoned: must stay NaN, bitwise
    t = dict(param=param, index=index, counts=counts, offset=offset, before=before)
    t["nonfinite"] = torch.zeros((), dtype=torch.int64)
    if state_bits == 8:
        t["exp_avg"] = torch.randint(0, 255, (n,), generator=gen, dtype=torch.uint8)
        t["exp_avg_sq"] = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
        blocks = sum(num_blocks(c) for c in counts)
        t["exp_avg_scale"] = torch.rand(blocks, generator=gen) * 0.1
        t["exp_avg_sq_scale"] = torch.rand(blocks, generator=gen) * 0.1
    else:
        t["exp_avg"] = torch.randn(n, generator=gen) * 0.1
        t["exp_avg_sq"] = torch.rand(n, generator=gen) * 0.01
    if rounding == "kahan" and dtype != torch.float32:
        t["compensation"] = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
    if amplify == "saliency":
        t["entry_scale"] = torch.randint(0, 255, (n,), generator=gen, dtype=torch.uint8)
    return t


def make_grads(tensors, step, compact, gen) -> dict:
    """Gradients of one step; the second step has a NaN and an inf at selected entries."""
    grads = {}
    for name, t in tensors.items():
        param, index = t["param"], t["index"].long()
        g = torch.randn(param.shape, generator=gen).to(param.dtype)
        if step == 1 and index.numel() > 1:
            g.view(-1)[index[0]] = float("nan")
            g.view(-1)[index[-1]] = float("-inf")
        grads[name] = g.view(-1)[index].clone() if compact else g
    return grads


def segment_calls(name, t, grad, step, case) -> list[dict]:
    """masked_adamw_'s arguments, one dict per segment, in the optimizer's slicing."""
    rounding, _, amplify, compact = case
    calls, start, block = [], 0, 0
    for s, count in enumerate(t["counts"]):
        entries = slice(start, start + count)
        blocks = slice(block, block + num_blocks(count))
        start, block = entries.stop, blocks.stop
        w = 1.0 if amplify == "saliency" else 1.5 + s + len(name) / 10
        call = dict(
            param=t["param"], grad=grad[entries] if compact else grad,
            exp_avg=t["exp_avg"][entries], exp_avg_sq=t["exp_avg_sq"][entries],
            index=t["index"][entries], step=t["before"] + step + 1, **HP,
            grad_scale=w if amplify == "grad" else 1.0,
            update_scale=1.0 if amplify == "grad" else w,
            nonfinite_count=t["nonfinite"], rounding=rounding, seed=11,
            offset=t["offset"], compact_grad=compact,
        )  # fmt: skip
        if "compensation" in t:
            call["compensation"] = t["compensation"][entries]
        if "exp_avg_scale" in t:
            call["exp_avg_scale"] = t["exp_avg_scale"][blocks]
            call["exp_avg_sq_scale"] = t["exp_avg_sq_scale"][blocks]
        if "entry_scale" in t:
            call.update(entry_scale=t["entry_scale"][entries], entry_scale_max=10.0)
        calls.append(call)
    return calls


def problem(case, seed=0) -> dict:
    """Every tensor of TENSORS, once in float32 and once in bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{name}/{str(dtype)[6:]}": make_tensor(name, dtype, case, gen)
        for dtype in (torch.float32, torch.bfloat16)
        for name in TENSORS
    }


def clone(tensors) -> dict:
    return {
        n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for n, t in tensors.items()
    }


def run(tensors, case, backend, multi: bool, steps=3) -> None:
    for step in range(steps):
        grads = make_grads(tensors, step, case[3], torch.Generator().manual_seed(100 + step))
        calls = [
            call
            for name, t in tensors.items()
            for call in segment_calls(name, t, grads[name], step, case)
        ]
        if multi:
            masked_adamw_multi_(calls, backend=backend)
        else:
            for call in calls:
                masked_adamw_(**call, backend=backend)


def assert_bitwise(a: dict, b: dict) -> None:
    for name in a:
        for key, value in a[name].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(bits(value), bits(b[name][key])), f"{name}: {key}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_multi_is_bitwise_the_per_segment_calls(backend, case):
    start = problem(case)
    one_by_one, multi = clone(start), clone(start)
    run(one_by_one, case, backend, multi=False)
    run(multi, case, backend, multi=True)
    assert_bitwise(one_by_one, multi)
    # The run did something: every tensor of several entries moved (a lone bfloat16
    # entry may round back under "nearest"), and the poisoned entries were counted.
    for name, t in multi.items():
        selected = t["index"].long()
        moved = bits(t["param"].view(-1)[selected]) != bits(start[name]["param"].view(-1)[selected])
        assert moved.any() or selected.numel() == 1, name
        assert int(t["nonfinite"]) == (2 if selected.numel() > 1 else 0), name


def run_grouped(tensors, case, backend, steps=3) -> None:
    """`run`'s steps through masked_adamw_grouped_unchecked_, as SAUAdamW makes them: one
    SegmentGroup per tensor, gathered once and kept for every step; per step only the
    shared arguments (a compact grad whole: its segments' entries one after another)."""
    rounding, _, _, compact = case
    gen = torch.Generator().manual_seed(100)
    first = make_grads(tensors, 0, compact, gen)
    groups = {
        n: A.segment_group(segment_calls(n, t, first[n], 0, case)) for n, t in tensors.items()
    }
    for step in range(steps):
        grads = make_grads(tensors, step, compact, torch.Generator().manual_seed(100 + step))
        pairs = []
        for name, t in tensors.items():
            shared = dict(
                param=t["param"], grad=grads[name], step=t["before"] + step + 1, **HP,
                nonfinite_count=t["nonfinite"], rounding=rounding, seed=11,
                offset=t["offset"], compact_grad=compact,
            )  # fmt: skip
            pairs.append((groups[name], shared))
        A.masked_adamw_grouped_unchecked_(pairs, backend=backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_grouped_is_bitwise_the_per_segment_calls(backend, case):
    start = problem(case, seed=2)
    one_by_one, grouped = clone(start), clone(start)
    run(one_by_one, case, backend, multi=False)
    run_grouped(grouped, case, backend)
    assert_bitwise(one_by_one, grouped)
    for name, t in grouped.items():  # the run did something (as above)
        selected = t["index"].long()
        moved = bits(t["param"].view(-1)[selected]) != bits(start[name]["param"].view(-1)[selected])
        assert moved.any() or selected.numel() == 1, name


def test_layout_table_is_cached_and_rebuilt_when_a_tensor_moves(backend):
    if backend != "triton":
        pytest.skip("the table belongs to the Triton launch")
    case = CASES[0]
    tensors = problem(case, seed=1)
    A._LAYOUT_CACHE.clear()
    run(tensors, case, backend, multi=True, steps=2)
    assert len(A._LAYOUT_CACHE) == 2  # one per dtype, built once for two steps
    # A param replaced by a copy at another address: a new table, and the right result.
    reference = clone(tensors)
    moved = clone(tensors)
    run(reference, case, backend, multi=False, steps=1)
    run(moved, case, backend, multi=True, steps=1)
    assert len(A._LAYOUT_CACHE) == 4
    assert_bitwise(reference, moved)


def test_shared_entries_and_bad_segments_are_refused_before_any_update():
    case = CASES[0]
    tensors = problem(case)
    t = tensors["matrix/float32"]
    grad = torch.randn(t["param"].shape)
    (call,) = segment_calls("matrix", t, grad, 0, case)
    before = t["param"].clone()
    twice = dict(call, exp_avg=call["exp_avg"].clone(), exp_avg_sq=call["exp_avg_sq"].clone())
    with pytest.raises(ValueError, match="more than once"):
        masked_adamw_multi_([call, twice])
    with pytest.raises(ValueError, match="Invalid lr"):
        masked_adamw_multi_([call, dict(call, lr=-1.0)])
    assert torch.equal(bits(t["param"]), bits(before))
