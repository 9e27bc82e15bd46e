"""sau.distributed without a process group: rank slices and their loss weights.

The averaged rank gradients must be the global batch's gradient for every objective,
whatever the world size, including a short last batch that leaves a rank without rows.
"""

from __future__ import annotations

import pytest
import torch

from sau import batching
from sau.distributed import DataParallel
from sau.unlearn import objectives as obj


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_rank_slices_cover_the_batch_once(world, n):
    rows = list(range(10, 10 + n))
    parts = [DataParallel(r, world, torch.device("cpu")).rows(rows) for r in range(world)]
    real = [p for p, w in parts if w == 1.0]
    assert sum(real, []) == rows  # contiguous, in order, each row once
    for p, w in parts:
        assert w in (0.0, 1.0) and (w == 1.0 or p == rows[:1])  # empty slice: weight 0
    assert max(map(len, real)) - min(map(len, real)) <= 1


def _loss(method, model, forget, retain, ref):
    if method == "ga":
        return obj.ga_loss(model, forget)
    if method == "graddiff":
        return obj.graddiff_loss(model, forget, retain)
    if method == "npo":
        return obj.npo_loss(model, forget, ref, retain)
    return obj.simnpo_loss(model, forget, retain)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("method", ["ga", "graddiff", "npo", "simnpo"])
@pytest.mark.parametrize("world", [2, 3])
def test_averaged_rank_gradients_are_the_global_gradient(make_tiny_lm, method, world):
    torch.set_num_threads(1)
    model, tok = make_tiny_lm(seed=1)
    rows = [
        {"question": f"Who is person {i}?", "answer": "A painter " * (1 + i % 3)} for i in range(10)
    ]
    enc, pad = batching.encode_rows(tok, rows), batching.pad_id(tok)
    f_idx, r_idx = [0, 1, 2, 3, 4], [9, 7, 5, 6, 8]
    ref = torch.linspace(-30.0, -10.0, 5)
    model.zero_grad()
    whole = [batching.collate([enc[i] for i in idx], pad) for idx in (f_idx, r_idx)]
    want_loss = _loss(method, model, whole[0], whole[1], ref)
    want_loss.backward()
    want = _grads(model)

    total, summed = 0.0, None
    for rank in range(world):
        dp = DataParallel(rank, world, torch.device("cpu"))
        forget, weight = dp.batch(enc, f_idx, pad)
        retain = dp.batch(enc, r_idx, pad)[0]
        model.zero_grad()
        loss = _loss(method, model, forget, retain, ref[dp.rows(f_idx)[0]]) * weight
        loss.backward()
        total += float(loss.detach()) / world
        g = _grads(model)
        summed = g if summed is None else [a + b for a, b in zip(summed, g)]
    torch.testing.assert_close(total, float(want_loss), rtol=1e-5, atol=1e-6)
    scale = max(float(b.abs().max()) for b in want)
    for a, b in zip(summed, want):
        # float32 sums in another order: rounding relative to the gradients' scale
        torch.testing.assert_close(a / world, b, rtol=1e-4, atol=1e-6 * scale)
