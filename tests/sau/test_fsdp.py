"""SAU under FSDP2 on 2 gloo ranks against one process on the same global batches.

Saliency, plan and 5 SAUAdamW steps on a sharded tiny Llama must match the single-process
run (allclose; selected sets compared where the saliency is bitwise equal), keep pruned
entries exactly 0 and unselected entries bitwise unchanged, and hold about 1/W of the
optimizer state per rank.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import sau_kernels as K
from sau import SAUAdamW, compute_saliency, plan_selection
from sau.distributed import DataParallel
from sau.errors import SAUError
from sau.unlearn.sharded_checkpoint import load_sharded, save_sharded
from sau_kernels.distributed import local_shard
from tests.helpers import llama_planned_names, pruned_tiny_llama, shard_llama
from tests.multiproc import count_collectives, dist_backend, run_ranks

WORLD = 2
GLOBAL_ROWS, TOKENS = 4, 10
pytestmark = pytest.mark.skipif(dist_backend() != "gloo", reason="the CPU (gloo) lane")


def _global_batches(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (GLOBAL_ROWS, TOKENS), generator=gen) for _ in range(n)]


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    # Equal lengths and no padding: every rank's token-mean has the same weight, so the
    # average of the rank losses' gradients (FSDP2's reduce-scatter) is the global one.
    return model(input_ids=ids, labels=ids).loss


def _run(model, rank: int, world: int) -> dict:
    """Saliency, plan, 5 steps on this rank's rows of every global batch."""
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    sal_batches = [b[rows] for b in _global_batches(3, seed=1)]
    names = llama_planned_names(model)
    saliency = compute_saliency(model, sal_batches, _loss, params=names, progress=False)
    plan = plan_selection(model.named_parameters(), saliency, k=0.3, alpha=0.5)
    opt = SAUAdamW(
        [p for p in model.parameters() if p.requires_grad], plan=plan, lr=1e-2, amplify="update"
    )
    for ids in _global_batches(5, seed=2):
        opt.zero_grad()
        _loss(model, ids[rows]).backward()
        opt.step()
    return {"saliency": saliency, "plan": plan, "opt": opt}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _agreement(rank: int, world: int) -> list[str]:
    """DataParallel.agree with equal, then rank-dependent inputs (mismatched files)."""
    dp = DataParallel(rank, world, torch.device("cpu"))
    out = []
    for text in ("same file", f"file of rank {rank}"):
        try:
            dp.agree(text, "input files")
            out.append("agreed")
        except SAUError as err:
            out.append(str(err))
    return out


def _moments(model, opt) -> dict:
    """{name: (global positions or flat start, exp_avg)} of this rank's optimizer state."""
    out = {}
    for n, p in model.named_parameters():
        st = opt.state.get(p)
        if st:
            off = local_shard(p.detach())[1]
            where = st["index"].long() + off if "index" in st else off
            out[n] = (where, st["exp_avg"].reshape(-1).clone())
    return out


def _ddp_run(rank: int, world: int, wrap: bool) -> dict:
    """3 SAU steps under DDP (wrap=True, this rank's rows) or in one process (all rows).

    The plan comes from the same (seeded) saliency on every rank, as DDP needs."""
    model = pruned_tiny_llama(seed=3)
    gen = torch.Generator().manual_seed(9)
    sal = {
        n: torch.rand(model.get_parameter(n).shape, generator=gen)
        for n in llama_planned_names(model)
    }
    plan = plan_selection(model.named_parameters(), sal, k=0.3, alpha=0.5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = SAUAdamW(trainable, plan=plan, lr=1e-2, amplify="update")
    net = model
    if wrap:
        net = DistributedDataParallel(model)
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    for ids in _global_batches(3, seed=4):
        opt.zero_grad()
        _loss(net, ids[rows]).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, ckpt: str) -> dict:
    model = pruned_tiny_llama()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    shard_llama(model)
    out = _run(model, rank, world)
    names = llama_planned_names(model)
    one = {names[0]: out["saliency"][names[0]]}
    counts = [
        count_collectives(lambda s=s: plan_selection(model.named_parameters(), s, k=0.3))
        for s in (one, out["saliency"])
    ]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    dp = DataParallel(rank, world, torch.device("cpu"))
    save_sharded(ckpt, dp, trainable, out["opt"], {"step": 5, "config": {}})
    return {
        "ddp": _ddp_run(rank, world, wrap=True),
        "moments": _moments(model, out["opt"]),
        "agree": _agreement(rank, world),
        "start": start,
        "saliency": {n: _full(s) for n, s in out["saliency"].items()},
        "local_index": {n: lp.selection.index for n, lp in out["plan"].items()},
        "offset": {n: lp.selection.offset for n, lp in out["plan"].items()},
        "stats": out["plan"].stats(),
        "params": {n: _full(p.detach()) for n, p in model.named_parameters()},
        "state_nbytes": out["opt"].state_nbytes(),
        "n_state": len(out["opt"].state),
        "collectives": counts,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    single_model = pruned_tiny_llama()
    single = _run(single_model, 0, 1)
    ckpt = tmp_path_factory.mktemp("sharded")
    return single_model, single, run_ranks(_worker, WORLD, str(ckpt)), ckpt


def test_saliency_matches_single_process(runs):
    _, single, ranks, _ = runs
    for n, s in single["saliency"].items():
        for r in ranks:
            # same global-batch gradients, summed in another order (reduce-scatter)
            # (measured: at most 2.3e-6 relative on this model)
            torch.testing.assert_close(r["saliency"][n], s, rtol=1e-5, atol=1e-12 * float(s.max()))


def test_selection_is_exact_and_matches_where_saliency_is_equal(runs):
    _, single, ranks, _ = runs
    for n, lp in single["plan"].items():
        gathered = torch.cat([r["local_index"][n].long() + r["offset"][n] for r in ranks])
        weight, sal = ranks[0]["start"][n], ranks[0]["saliency"][n]
        # exact over the whole layer: what one process selects on the gathered saliency
        assert torch.equal(gathered, K.select_topk(sal, weight, 0.3).index.long())
        if torch.equal(sal, single["saliency"][n]):
            assert torch.equal(gathered, lp.selection.index.long())
        # elsewhere the sets may differ only at entries within rounding of tau
        ours, theirs = set(gathered.tolist()), set(lp.selection.index.tolist())
        tau = float(lp.selection.threshold)
        for i in ours ^ theirs:
            assert abs(float(single["saliency"][n].view(-1)[i]) - tau) <= 1e-5 * tau
    assert ranks[0]["stats"] == ranks[1]["stats"]  # global stats, identical on all ranks


def test_five_steps_match_single_process(runs):
    single_model, _, ranks, _ = runs
    for n, p in single_model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["params"][n], p.detach())


def test_pruned_stay_zero_and_unselected_are_bitwise_unchanged(runs):
    _, single, ranks, _ = runs
    r = ranks[0]
    for n in single["plan"]:
        start, after = r["start"][n].view(-1), r["params"][n].view(-1)
        chosen = torch.zeros(start.numel(), dtype=torch.bool)
        for rr in ranks:
            chosen[rr["local_index"][n].long() + rr["offset"][n]] = True
        assert torch.equal(after[start == 0], start[start == 0])
        assert torch.equal(after[~chosen], start[~chosen])
        assert not torch.equal(after[chosen], start[chosen])


def test_state_is_split_across_ranks(runs):
    _, single, ranks, _ = runs
    # moments and index split exactly; every rank keeps its own step and skip counters
    # (4 + 8 bytes per parameter with state)
    counters = 12 * single["opt"].state.__len__()
    total = sum(r["state_nbytes"] for r in ranks)
    assert total == single["opt"].state_nbytes() + (WORLD - 1) * counters
    assert max(r["state_nbytes"] for r in ranks) < 0.75 * single["opt"].state_nbytes()


def test_mismatched_inputs_fail_on_every_rank(runs):
    for r in runs[2]:
        assert r["agree"] == ["agreed", "ranks [1] loaded different input files than rank 0"]


def test_plan_collectives_do_not_grow_with_layers(runs):
    for r in runs[2]:
        one_layer, all_layers = r["collectives"]
        assert one_layer == all_layers > 0


def test_sharded_checkpoint_loads_into_one_process(runs):
    """Saved on 2 ranks (global positions), loaded into a plain model and optimizer."""
    _, single, ranks, ckpt = runs
    model = pruned_tiny_llama()  # the run's pruned model, every weight then changed:
    with torch.no_grad():  # all values must come from the checkpoint; zeros stay pruned
        for p in model.parameters():
            p.mul_(2.0)
    plan = single["plan"]  # any plan: the loaded state replaces index and moments
    fresh = plan_selection(model.named_parameters(), dict(single["saliency"]), k=0.1)
    opt = SAUAdamW([p for p in model.parameters() if p.requires_grad], plan=fresh, lr=1e-2)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    meta = load_sharded(ckpt, trainable, opt)
    assert meta["step"] == 5 and meta["world"] == WORLD
    for n, p in trainable.items():
        assert torch.equal(p.detach(), ranks[0]["params"][n])
        st = opt.state[p]
        pieces = [r["moments"][n] for r in ranks]
        if n in plan:
            assert torch.equal(st["index"].long(), torch.cat([w for w, _ in pieces]))
            assert st["index"].dtype == torch.int32
            assert torch.equal(st["exp_avg"], torch.cat([m for _, m in pieces]))
        else:  # dense: the flat shards in order
            assert torch.equal(st["exp_avg"].reshape(-1), torch.cat([m for _, m in pieces]))
        assert int(st["step"]) == 5


def test_ddp_step_matches_single_process(runs):
    """DDP needs no change: it averages the gradients before SAUAdamW.step()."""
    want = _ddp_run(0, 1, wrap=False)
    for r in runs[2]:
        for n, p in want.items():
            torch.testing.assert_close(r["ddp"][n], p)
