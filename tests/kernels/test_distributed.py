"""sau_kernels.distributed against one-process select_topk on the gathered tensors.

Spawns the ranks once per module (gloo on 127.0.0.1; SAU_TEST_DIST=nccl runs one rank
on a CUDA device with NCCL, and the compiled Triton kernels when SAU_BACKEND allows).
Each layer is sharded on dim 0 the way FSDP2 shards it (torch.chunk of the rows).
"""

from __future__ import annotations

import pytest
import torch

import sau_kernels as K
from sau_kernels import distributed as D
from tests.multiproc import count_collectives, dist_backend, run_ranks

WORLD = 1 if dist_backend() == "nccl" else 2
KS = (0.1, 0.3, 1.0)


def _layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full (scores, weight) per case; every rank builds the same ones from fixed seeds."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(shape, generator=gen)

    out = {}
    w = torch.randn(37, 45, generator=gen)
    w[rand(37, 45) < 0.5] = 0
    out["random"] = (rand(37, 45) ** 3, w)
    out["fully_pruned"] = (rand(9, 5), torch.zeros(9, 5))
    out["no_pruning"] = (rand(11, 6) + 0.01, torch.randn(11, 6, generator=gen).abs() + 0.1)
    # 10 rows of 8: with 2 ranks the shard boundary lies between rows 4 and 5, inside a
    # run of equal scores (rows 3..6) that holds tau for k = 0.3 and 0.5.
    s = rand(10, 8) * 0.5
    s[3:7] = 0.75
    s[:2] = 0.9
    out["ties_across_boundary"] = (s, torch.ones(10, 8))
    w = torch.randn(7, 3, generator=gen)
    w[rand(7, 3) < 0.3] = 0
    out["uneven_rows"] = (rand(7, 3), w)  # 4 + 3 rows
    out["one_row"] = (rand(1, 16), torch.randn(1, 16, generator=gen))  # rank 1 holds none
    s = rand(12, 7)
    s[rand(12, 7) < 0.6] = 0  # zero saliency is never selected, not even as a tie at tau
    out["zero_saliency"] = (s, torch.randn(12, 7, generator=gen))
    out["all_zero_saliency"] = (torch.zeros(6, 4), torch.ones(6, 4))
    out["bf16_weight"] = (rand(8, 33), torch.randn(8, 33, generator=gen).to(torch.bfloat16))
    return out


def _shard(t: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    chunks = torch.chunk(t, world, dim=0)
    rows_before = sum(c.shape[0] for c in chunks[:rank])
    local = chunks[rank] if rank < len(chunks) else t[:0]
    return local.contiguous(), rows_before * (t[0].numel() if t.shape[0] else 0)


def _as_dict(sel) -> dict:
    return {
        "index": sel.index.cpu(),
        "offset": sel.offset,
        "threshold": sel.threshold.cpu(),
        "n_survivors": sel.n_survivors,
        "n_selected": sel.n_selected,
        "importances": torch.stack(
            [sel.importance_pruned, sel.importance_survivors, sel.importance_selected]
        ).cpu(),
    }


def _worker(rank: int, world: int) -> dict:
    device = torch.device("cuda" if dist_backend() == "nccl" else "cpu")
    layers = _layers()
    names = list(layers)
    shards = {n: [_shard(t, rank, world) for t in layers[n]] for n in names}
    scores = [shards[n][0][0].to(device) for n in names]
    weights = [shards[n][1][0].to(device) for n in names]
    offsets = [shards[n][1][1] for n in names]
    result: dict = {"selections": {}}
    for k in KS:
        sels = D.select_topk_sharded(scores, weights, offsets, k)
        result["selections"][str(k)] = {n: _as_dict(s) for n, s in zip(names, sels)}
    # ties inside the run that crosses the shard boundary
    sel = D.select_topk_sharded(scores[3:4], weights[3:4], offsets[3:4], 0.5)[0]
    result["ties_k05"] = _as_dict(sel)
    # collectives do not grow with the number of layers
    result["collectives"] = {
        n_layers: count_collectives(
            lambda n_layers=n_layers: D.select_topk_sharded(
                (scores * 3)[:n_layers], (weights * 3)[:n_layers], (offsets * 3)[:n_layers], 0.3
            )
        )
        for n_layers in (1, 7, 21)
    }
    # a bad shard on the last rank only: every rank raises instead of hanging
    bad = [s.clone() for s in scores]
    if rank == world - 1:
        bad[0].view(-1)[0] = float("nan")
    try:
        D.select_topk_sharded(bad, weights, offsets, 0.3)
        result["bad_input"] = "no error"
    except ValueError as err:
        result["bad_input"] = str(err)
    # DTensors: local_shard finds the offset, select_topk_many batches the layers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(device.type, (world,))
    s_dt = [distribute_tensor(layers[n][0].to(device), mesh, [Shard(0)]) for n in names]
    w_dt = [distribute_tensor(layers[n][1].to(device), mesh, [Shard(0)]) for n in names]
    result["dtensor_offsets"] = [D.local_shard(w)[1] for w in w_dt]
    many = D.select_topk_many(s_dt, w_dt, 0.3)
    result["many"] = {n: _as_dict(s) for n, s in zip(names, many)}
    return result


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    if dist_backend() == "nccl" and not torch.cuda.is_available():
        pytest.skip("SAU_TEST_DIST=nccl needs a CUDA device")
    return run_ranks(_worker, WORLD)


def _assert_matches_one_process(per_rank: list[dict], scores, weight, k):
    device = torch.device("cuda" if dist_backend() == "nccl" else "cpu")
    want = K.select_topk(scores.to(device), weight.to(device), k)
    gathered = torch.cat([r["index"].long() + r["offset"] for r in per_rank])
    assert torch.equal(gathered, want.index.long().cpu())
    for r in per_rank:
        assert r["index"].dtype == torch.int32
        assert torch.equal(r["threshold"], want.threshold.cpu())  # bitwise: tau is a score
        assert (r["n_survivors"], r["n_selected"]) == (want.n_survivors, want.n_selected)
        expect = torch.stack(
            [want.importance_pruned, want.importance_survivors, want.importance_selected]
        ).cpu()
        # float64 sums in another order: agree to float64 rounding
        torch.testing.assert_close(r["importances"], expect, atol=1e-12, rtol=1e-12)
        # the global stats are bitwise the same on every rank
        assert torch.equal(r["importances"], per_rank[0]["importances"])
        assert torch.equal(r["threshold"], per_rank[0]["threshold"])


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case", list(_layers()))
def test_gathered_selection_is_one_process_selection(ranks, case, k):
    scores, weight = _layers()[case]
    per_rank = [r["selections"][str(k)][case] for r in ranks]
    _assert_matches_one_process(per_rank, scores, weight, k)


def test_ties_across_the_shard_boundary_are_all_selected(ranks):
    scores, weight = _layers()["ties_across_boundary"]
    per_rank = [r["ties_k05"] for r in ranks]
    _assert_matches_one_process(per_rank, scores, weight, 0.5)
    assert float(per_rank[0]["threshold"]) == 0.75
    if WORLD == 2:  # both ranks hold part of the tied run
        assert all(r["index"].numel() > 0 for r in per_rank)


def test_fully_pruned_layer_selects_nothing(ranks):
    for r in ranks:
        sel = r["selections"]["0.3"]["fully_pruned"]
        assert sel["n_survivors"] == sel["n_selected"] == 0 and sel["index"].numel() == 0
        assert sel["threshold"] == float("inf")


def test_collectives_do_not_grow_with_layers(ranks):
    for r in ranks:
        counts = r["collectives"]
        assert counts[1] == counts[7] == counts[21] <= 6, counts


def test_bad_input_on_one_rank_fails_every_rank(ranks):
    for rank, r in enumerate(ranks):
        assert r["bad_input"] != "no error"
        if rank == len(ranks) - 1:
            assert "finite" in r["bad_input"]
        else:
            assert "rank(s) [" in r["bad_input"]


def test_dtensor_layers_match(ranks):
    layers = _layers()
    for n, (scores, weight) in layers.items():
        _assert_matches_one_process([r["many"][n] for r in ranks], scores, weight, 0.3)
    for rank, r in enumerate(ranks):
        assert r["dtensor_offsets"] == [_shard(w, rank, WORLD)[1] for _, w in layers.values()]


def test_bad_arguments_raise_before_any_collective():
    s = torch.rand(4)
    with pytest.raises(ValueError, match="k must be"):
        D.select_topk_sharded([s], [s], [0], 0.0)
    with pytest.raises(ValueError, match="one entry per layer"):
        D.select_topk_sharded([s], [s], [], 0.3)
