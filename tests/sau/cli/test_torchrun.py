"""`torchrun -m sau unlearn` on 2 gloo ranks: SIGTERM mid-run, resume on 1 rank.

The resumed run must end within float tolerance of an uninterrupted 2-rank run: the
global batch does not depend on the number of ranks, and the sharded checkpoint holds
global positions, so it reshards from 2 ranks to 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.multiproc import dist_backend

pytestmark = pytest.mark.skipif(dist_backend() != "gloo", reason="the CPU (gloo) lane")
REPO = Path(__file__).resolve().parents[3]
# 8 forget rows, global batch 4, 3 epochs: 6 steps; a checkpoint after every step.
TINY = {"eval_retain_rows": 8, "max_new_tokens": 4, "batch_size": 4, "epochs": 3}


@pytest.fixture(scope="module")
def files(make_cli_files):
    return make_cli_files("torchrun", TINY)


def _torchrun(files: Path, nproc: int, out: Path, *extra: str, config="tiny.json"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "sau", "unlearn", "--no-progress"]
    for flag in ("forget", "retain", "holdout"):
        cmd += [f"--{flag}", str(files / f"{flag}.jsonl")]
    cmd += ["--model", str(files / "model"), "--config", str(files / config)]
    cmd += ["--prune", "magnitude", "--checkpoint-every", "1", "--out", str(out), *extra]
    # A session of its own: SIGTERM goes to torchrun and every rank, as a scheduler does.
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, text=True
    )


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_sigterm_on_2_ranks_resumes_on_1_rank(files, tmp_path):
    full, out = tmp_path / "full", tmp_path / "out"
    run = _torchrun(files, 2, full)
    assert run.wait(timeout=300) == 0, run.stderr.read()

    run = _torchrun(files, 2, out)
    latest = tmp_path / ".out.partial" / "checkpoints" / "sau" / "sharded" / "latest"
    while run.poll() is None and not latest.exists():  # the first checkpoint: step 1
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGTERM)
    err = run.communicate(timeout=300)[1]
    assert run.returncode != 0 and not out.exists(), err
    assert "--resume" in err  # rank 0 says how to continue
    step = int(latest.read_text().split("-")[1])
    assert 1 <= step < 6  # stopped mid-run

    run = _torchrun(files, 1, out, "--resume")
    assert run.wait(timeout=300) == 0, run.stderr.read()
    a, b = _weights(full), _weights(out)
    assert a.keys() == b.keys()
    for k in a:  # the same global batches; sums over 2 ranks vs 1 differ in rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    worlds = [json.loads((d / "results.json").read_text())["config"] for d in (full, out)]
    assert [c["world_size"] for c in worlds] == [2, 1]
    assert json.loads((full / "results.json").read_text())["rows"][0]["sparsity_kept"] == 1.0


def test_world_larger_than_the_global_batch_is_one_line(files, tmp_path):
    (files / "one.json").write_text(json.dumps({**TINY, "batch_size": 1}))
    run = _torchrun(files, 2, tmp_path / "out", config="one.json")
    err = run.communicate(timeout=300)[1]
    assert run.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("sau unlearn: error:")]
    assert len(lines) == 1 and "world size 2 is larger than the global batch" in lines[0]
    assert not (tmp_path / "out").exists()
