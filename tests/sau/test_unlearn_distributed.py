"""The unlearning loop on 2 FSDP2 ranks against one process, on batches that leave a
rank's slice empty: the results must agree within float tolerance.

5 forget rows in global batches of 4: the second batch has 1 row, so rank 1 runs a
placeholder forget row with weight 0 and must still add its share of the retain terms.
One retain row: rank 1's retain slice is empty and its placeholder must add nothing.
"""

from __future__ import annotations

import pytest
import torch

from sau import SAUAdamW
from sau.distributed import DataParallel, shard_model
from sau.lab.models import load_model
from sau.unlearn import UnlearnConfig, unlearn
from tests.multiproc import dist_backend, run_ranks

pytestmark = pytest.mark.skipif(dist_backend() != "gloo", reason="the CPU (gloo) lane")

ROWS = [{"question": f"Who is person {i}?", "answer": f"A painter from {i}."} for i in range(11)]
FORGET, RETAIN = ROWS[:5], ROWS[5:]
# (method, number of retain rows): GradDiff and NPO with a retain term; one retain row
# leaves rank 1 without retain rows.
CASES = [("graddiff", 6), ("npo", 6), ("graddiff", 1)]


def _unlearned(model_dir: str, method: str, n_retain: int, dp) -> dict:
    model, tok = load_model(model_dir)
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    if dp is not None:
        shard_model(model, dp)
    params = [model.get_parameter(n) for n in names]
    opt = SAUAdamW(params, lr=1e-2)
    cfg = UnlearnConfig(method=method, epochs=2, batch_size=4, checkpoint_seconds=0)
    unlearn(model, tok, FORGET, RETAIN[:n_retain], opt, cfg, progress=False, data_parallel=dp)
    full = [p.detach().full_tensor() if dp is not None else p.detach() for p in params]
    return dict(zip(names, full))


def _worker(rank: int, world: int, model_dir: str) -> dict:
    dp = DataParallel(rank, world, torch.device("cpu"))
    return {f"{m}-{n}": _unlearned(model_dir, m, n, dp) for m, n in CASES}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tiny_lm):
    path = tmp_path_factory.mktemp("loop-dist") / "model"
    model, tok = make_tiny_lm(seed=4)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ranks(model_dir):
    torch.set_num_threads(1)
    return run_ranks(_worker, 2, model_dir)


@pytest.mark.parametrize(("method", "n_retain"), CASES)
def test_an_empty_rank_slice_keeps_the_other_terms(ranks, model_dir, method, n_retain):
    # Before: the placeholder forget row's weight 0 multiplied the whole loss, retain term
    # included, and a placeholder retain row counted in full: 5e-2 to 7.5e-2 off (largest
    # weight difference). Now at most 4e-6: Adam's division by sqrt(v) magnifies the
    # other summation order of a few near-zero gradient entries.
    torch.manual_seed(0)
    want = _unlearned(model_dir, method, n_retain, None)
    for rank in ranks:
        got = rank[f"{method}-{n_retain}"]
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5)
