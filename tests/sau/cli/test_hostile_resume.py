"""`torchrun -m sau unlearn` on hostile state: a planted pickle or a truncated file in
the sharded checkpoint, a `latest` that points elsewhere, an --out another run holds.

Each must end every rank with at most one line (rank 0's `sau unlearn: error:`; the other
ranks stop silently with the same status), run no planted code and write nothing. The
launcher's own ChildFailedError report follows (docs/distributed.md); no rank prints a
traceback.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sau.lab.outdir import OutLock
from tests.multiproc import dist_backend

pytestmark = pytest.mark.skipif(dist_backend() != "gloo", reason="the CPU (gloo) lane")
REPO = Path(__file__).resolve().parents[3]
# 8 forget rows, global batch 4, 3 epochs: 6 steps; a checkpoint after every step.
TINY = {"eval_retain_rows": 8, "max_new_tokens": 4, "batch_size": 4, "epochs": 3}


class Payload:
    """Unpickling this calls open(path, "w"): the file's existence proves code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def files(make_cli_files):
    return make_cli_files("hostile-resume", TINY)


def _torchrun(files: Path, out: Path, *extra: str, nproc: int = 2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "sau", "unlearn", "--no-progress"]
    for flag in ("forget", "retain"):
        cmd += [f"--{flag}", str(files / f"{flag}.jsonl")]
    cmd += ["--model", str(files / "model"), "--config", str(files / "tiny.json")]
    cmd += ["--prune", "magnitude", "--checkpoint-every", "1", "--out", str(out), *extra]
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def interrupted(files, tmp_path_factory):
    """The work directory of a 2-rank run stopped by SIGTERM after its first checkpoint."""
    root = tmp_path_factory.mktemp("interrupted")
    run = _torchrun(files, root / "out")
    latest = root / ".out.partial" / "checkpoints" / "sau" / "sharded" / "latest"
    while run.poll() is None and not latest.exists():
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGTERM)
    err = run.communicate(timeout=300)[1]
    assert latest.exists() and not (root / "out").exists(), err
    return root / ".out.partial"


def _resume_with(interrupted: Path, tmp_path: Path, edit) -> tuple[Path, Path]:
    """A copy of the interrupted run beside tmp_path/out, edited by edit(step_dir)."""
    work = tmp_path / ".out.partial"
    shutil.copytree(interrupted, work, symlinks=True)
    sharded = work / "checkpoints" / "sau" / "sharded"
    edit(sharded / (sharded / "latest").read_text().strip())
    return tmp_path / "out", tmp_path / "PWNED"


def _one_line_per_rank(run, words: str) -> str:
    err = run.communicate(timeout=300)[1]
    assert run.returncode != 0, err
    ours = [line for line in err.splitlines() if line.startswith("sau unlearn:")]
    assert len(ours) == 1 and ours[0].startswith("sau unlearn: error:") and words in ours[0], err
    assert 'File "' + str(REPO / "sau") not in err, err  # no rank's traceback
    assert re.search(r"exitcode\s*: 2", err), err  # the launcher's table: a rank's status
    return ours[0]


def _plant_torch(path: Path, mark: Path) -> None:
    torch.save({"state": Payload(mark), "world": 2}, path)


def _plant_pickle(path: Path, mark: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(mark)))


@pytest.mark.parametrize(
    ("name", "plant"),
    [("meta.pt", _plant_torch), ("optim-rank1.pt", _plant_pickle),
     ("weights-rank1.safetensors", _plant_pickle)],
)  # fmt: skip
def test_a_planted_pickle_in_the_sharded_checkpoint_never_runs(
    files, interrupted, tmp_path, name, plant
):
    # Before (the weights' torch.distributed.checkpoint .metadata): plain pickle.load ran it.
    mark = tmp_path / "PWNED"
    out, _ = _resume_with(interrupted, tmp_path, lambda step: plant(step / name, mark))
    line = _one_line_per_rank(_torchrun(files, out, "--resume"), name)
    assert not mark.exists(), line
    assert not out.exists()


def test_a_truncated_checkpoint_is_one_line(files, interrupted, tmp_path):
    # Before: 3 tracebacks (each rank's, and the launcher's).
    def truncate(step: Path) -> None:
        path = step / "weights-rank0.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    out, _ = _resume_with(interrupted, tmp_path, truncate)
    _one_line_per_rank(_torchrun(files, out, "--resume"), "truncated")


def test_latest_cannot_point_outside_its_directory(files, interrupted, tmp_path):
    # Before: `latest` was joined to the path unchecked.
    def escape(step: Path) -> None:
        (step.parent / "latest").write_text("../../../elsewhere")

    out, _ = _resume_with(interrupted, tmp_path, escape)
    _one_line_per_rank(_torchrun(files, out, "--resume"), "does not name a step directory")


def test_a_second_torchrun_on_a_locked_out_is_one_line(files, tmp_path):
    # Before: rank 0 printed the lock line, rank 1 died in a broadcast with a traceback.
    out = tmp_path / "out"
    with OutLock(out):
        line = _one_line_per_rank(_torchrun(files, out), "another sau run")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]  # ours only
    assert f"pid {os.getpid()}" in line


def test_a_single_process_checkpoint_is_not_silently_restarted_under_torchrun(
    files, tmp_path, monkeypatch, capsys
):
    # Before: torchrun --resume found no sharded checkpoint and started over unasked.
    import sau.lab.pipeline as pipeline
    from sau.cli import main

    real = pipeline.unlearn
    monkeypatch.setattr(
        pipeline, "unlearn", lambda *a, **k: real(*a, **k, should_stop=lambda s: s == 1)
    )
    out = tmp_path / "out"
    argv = ["unlearn", "--no-progress", "--model", str(files / "model"), "--prune", "magnitude"]
    for flag in ("forget", "retain"):
        argv += [f"--{flag}", str(files / f"{flag}.jsonl")]
    assert main([*argv, "--config", str(files / "tiny.json"), "--out", str(out)]) == 130
    capsys.readouterr()
    _one_line_per_rank(_torchrun(files, out, "--resume"), "checkpointed in one process")
