"""Hostile sharded checkpoints on 2 gloo ranks: refused in one line, the same on every
rank, and never unpickled.

One run saves a real sharded checkpoint (a SAUAdamW step on a sharded, pruned tiny Llama),
then each case edits it on rank 0 (a code-running pickle as each file the resume reads, a
`latest` that points elsewhere, links, truncated files, inconsistent shards), every rank
calls load_sharded, and the files are put back. The pickle's payload would create MARK.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sau import SAUAdamW, compute_saliency, plan_selection
from sau.distributed import DataParallel
from sau.errors import SAUError
from sau.unlearn.sharded_checkpoint import load_sharded, save_sharded
from tests.helpers import llama_planned_names, pruned_tiny_llama, shard_llama
from tests.multiproc import dist_backend, run_ranks

pytestmark = pytest.mark.skipif(dist_backend() != "gloo", reason="the CPU (gloo) lane")
WORLD = 2
STEP = "step-000000001"


class Payload:
    """Unpickling this calls open(path, "w"): the file's existence proves code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(path: Path, mark: Path, fmt: str) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        torch.save({"state": Payload(mark), "world": Payload(mark)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(mark)))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_torch(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _prune_pick(state: dict, pruned_at: int) -> None:
    """Point one saved optimizer position at an entry that is pruned (0) in the model."""
    name = next(n for n, e in state["state"].items() if "positions" in e)
    entry = state["state"][name]
    entry["positions"] = entry["positions"].clone()
    entry["positions"][0] = pruned_at


def _case(case: str, root: Path, mark: Path, pruned_at: int) -> None:
    """Edit the saved checkpoint at root/sharded as `case` says (rank 0 only)."""
    sharded, outside = root / "sharded", root.parent / f"{root.name}-outside"
    step = sharded / STEP
    if case.startswith("pickle:"):
        _, fmt, name = case.split(":")
        _plant(sharded / name if name == "latest" else step / name, mark, fmt)
    elif case.startswith("latest="):
        (sharded / "latest").write_text(case.split("=", 1)[1].replace("OUTSIDE", str(outside)))
    elif case == "latest-link":
        (outside / "name").write_text(STEP)
        (sharded / "latest").unlink()
        (sharded / "latest").symlink_to(outside / "name")
    elif case == "latest-fifo":  # opening it for reading would block forever
        (sharded / "latest").unlink()
        os.mkfifo(sharded / "latest")
    elif case == "step-link":
        shutil.rmtree(step)
        step.symlink_to(outside / STEP)
    elif case == "meta-link":
        (step / "meta.pt").unlink()
        (step / "meta.pt").symlink_to(outside / STEP / "meta.pt")
    elif case.startswith("truncate:"):
        _truncate(step / case.split(":")[1])
    elif case.startswith("missing:"):
        (step / case.split(":")[1]).unlink()
    elif case == "world-3":
        _edit_torch(step / "meta.pt", lambda m: m.update(world=3))
    elif case == "world-1":  # rank 1's weights missing from the tiling
        _edit_torch(step / "meta.pt", lambda m: m.update(world=1))
    elif case == "swap-weights":  # rank 1's shard saved as rank 0's: a gap and an overlap
        shutil.copy(step / "weights-rank1.safetensors", step / "weights-rank0.safetensors")
    elif case == "pruned-position":
        _edit_torch(step / "optim-rank1.pt", lambda s: _prune_pick(s, pruned_at))


CASES = [
    "untouched",
    "pickle:pickle:latest",
    "pickle:torch:meta.pt",
    "pickle:pickle:meta.pt",
    "pickle:torch:optim-rank0.pt",
    "pickle:pickle:optim-rank1.pt",
    "pickle:torch:weights-rank0.safetensors",
    "pickle:pickle:weights-rank1.safetensors",
    "pickle:pickle:model/.metadata",  # what torch.distributed.checkpoint unpickled: unread
    "latest=../../x",
    "latest=OUTSIDE/" + STEP,
    f"latest={STEP}/..",
    f"latest={STEP}/../{STEP}",
    "latest=",
    "latest=step-1",
    "latest-link",
    "latest-fifo",
    "step-link",
    "meta-link",
    "truncate:weights-rank1.safetensors",
    "truncate:optim-rank0.pt",
    "truncate:meta.pt",
    "missing:optim-rank1.pt",
    "missing:weights-rank0.safetensors",
    "world-3",
    "world-1",
    "swap-weights",
    "pruned-position",
]


def _model_and_optimizer(rank: int, world: int):
    model = pruned_tiny_llama()
    shard_llama(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 10), generator=gen)[rank * 2 : rank * 2 + 2]

    def loss(m, batch):
        return m(input_ids=batch, labels=batch).loss

    names = llama_planned_names(model)
    sal = compute_saliency(model, [ids], loss, params=names, progress=False)
    plan = plan_selection(model.named_parameters(), sal, k=0.3)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = SAUAdamW(trainable.values(), plan=plan, lr=1e-2)
    loss(model, ids).backward()
    opt.step()
    return trainable, opt


def _pruned_position(trainable: dict) -> int:
    """The global flat position of a pruned entry of the first planned weight."""
    name = next(n for n in trainable if n.endswith("proj.weight"))
    full = trainable[name].detach().full_tensor().reshape(-1)
    return int((full == 0).nonzero()[-1])


def _worker(rank: int, world: int, root: str, mark: str) -> dict:
    root, mark = Path(root), Path(mark)
    dp = DataParallel(rank, world, torch.device("cpu"))
    trainable, opt = _model_and_optimizer(rank, world)
    save_sharded(root, dp, trainable, opt, {"step": 1, "config": {}})
    pruned_at = _pruned_position(trainable)
    backup = root.parent / f"{root.name}-backup"
    if rank == 0:
        shutil.copytree(root, backup, symlinks=True)
    out = {}
    for case in CASES:
        outside = root.parent / f"{root.name}-outside"
        if rank == 0:
            shutil.rmtree(root)
            shutil.copytree(backup, root, symlinks=True)
            shutil.rmtree(outside, ignore_errors=True)
            shutil.copytree(backup / "sharded", outside, symlinks=True)
            _case(case, root, mark, pruned_at)
        dp.barrier()
        try:
            load_sharded(root, trainable, opt, dp)
            out[case] = "loaded"
        except SAUError as err:
            out[case] = str(err)
        out[case + ":ran"] = os.path.exists(mark)
        dp.barrier()
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("hostile-sharded")
    mark = base / "PWNED"
    return run_ranks(_worker, WORLD, str(base / "ckpt"), str(mark)), mark


def test_the_payload_is_live(tmp_path):
    mark = tmp_path / "PWNED"
    _plant(tmp_path / "p", mark, "pickle")
    pickle.loads((tmp_path / "p").read_bytes())
    assert mark.exists()


def test_an_untouched_checkpoint_loads(outcomes):
    ranks, _ = outcomes
    assert [r["untouched"] for r in ranks] == ["loaded"] * WORLD


def test_the_files_of_the_old_layout_are_never_read(outcomes):
    # Before: dcp.load unpickled step/model/.metadata with plain pickle.load.
    ranks, mark = outcomes
    assert [r["pickle:pickle:model/.metadata"] for r in ranks] == ["loaded"] * WORLD
    assert not mark.exists()


@pytest.mark.parametrize("case", [c for c in CASES if c != "untouched" and ".metadata" not in c])
def test_hostile_checkpoint_is_one_line_on_every_rank(outcomes, case):
    ranks, mark = outcomes
    messages = [r[case] for r in ranks]
    assert not any(r[case + ":ran"] for r in ranks) and not mark.exists(), "a pickle ran"
    assert messages[0] != "loaded", case
    assert messages[0] == messages[1], messages  # every rank stops with the same line
    assert "\n" not in messages[0] and "Traceback" not in messages[0]
    assert "sharded" in messages[0]  # names where


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("latest=../../x", "does not name a step directory"),
        (f"latest={STEP}/..", "does not name a step directory"),
        ("latest=OUTSIDE/" + STEP, "does not name a step directory"),
        ("latest-link", "symbolic link"),
        ("step-link", "not a plain directory"),
        ("meta-link", "not a plain file"),
        ("world-1", "saved ranges cover"),
        ("swap-weights", "do not tile"),
        ("pruned-position", "exactly 0"),
        ("truncate:weights-rank1.safetensors", "not a readable safetensors file"),
        ("pickle:torch:meta.pt", "refused unread, never run"),
        ("truncate:optim-rank0.pt", "optim-rank0.pt: not a readable sau checkpoint"),
    ],
)
def test_refusals_name_the_problem(outcomes, case, words):
    ranks, _ = outcomes
    assert words in ranks[0][case], ranks[0][case]
