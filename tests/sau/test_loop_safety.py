"""The loop's own guards: rows, checkpoint interval, NaN runs."""

from __future__ import annotations

import pytest
import torch

from sau.errors import RunFailedError, SAUError
from sau.unlearn.loop import CHECKPOINT_NAME, UnlearnConfig, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"question": f"Who is {i}?", "answer": f"A painter from town {i}."} for i in range(6)]


def test_resume_with_other_rows_of_the_same_length_is_refused(tiny_lm_adamw, tmp_path):
    # Before: resumed silently (and a shorter file crashed with IndexError).
    model, tok, opt = tiny_lm_adamw
    cfg = UnlearnConfig(method="ga", epochs=2, batch_size=3)
    unlearn(model, tok, ROWS, [], opt, cfg, checkpoint_dir=tmp_path, progress=False,
            should_stop=lambda s: s == 1)  # fmt: skip
    other = [{**r, "answer": r["answer"] + "!"} for r in ROWS]
    for rows in (other, other[:3]):
        with pytest.raises(SAUError, match="forget/retain rows"):
            unlearn(model, tok, rows, [], opt, cfg, checkpoint_dir=tmp_path, resume=True,
                    progress=False)  # fmt: skip


def test_checkpoint_by_time(tiny_lm_adamw, tmp_path, monkeypatch):
    # Before: every 25 steps, hard-coded; the 25-step demo never had a mid-run checkpoint.
    import sau.unlearn.loop as loop

    model, tok, opt = tiny_lm_adamw
    clock = iter(range(0, 1000, 10))  # each reading 10 s later
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    saved = []
    monkeypatch.setattr(
        loop.ckpt, "save_atomic", lambda payload, path: saved.append(payload["step"])
    )
    cfg = UnlearnConfig(method="ga", epochs=2, batch_size=3, checkpoint_seconds=15)
    unlearn(model, tok, ROWS, [], opt, cfg, checkpoint_dir=tmp_path, progress=False)
    assert saved == [2, 4]  # 15 s pass by step 2; the end (step 4) always saves


def test_every_loss_nan_is_a_failed_run(tiny_lm_adamw, tmp_path):
    model, tok, opt = tiny_lm_adamw
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(RunFailedError, match="NaN or inf at every one of the 4 steps"):
        unlearn(model, tok, ROWS, [], opt, UnlearnConfig(method="ga", epochs=2, batch_size=3),
                checkpoint_dir=tmp_path, progress=False)  # fmt: skip
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # no final checkpoint of a failed run


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"retain_weight": float("nan")}, "retain_weight must be a finite number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"checkpoint_seconds": -1.0}, "checkpoint_seconds must be >= 0"),
        ({"retain_batch_size": 0}, "retain_batch_size must be >= 1"),
    ],
)
def test_config_types_and_ranges(change, match):
    with pytest.raises(SAUError, match=match):
        UnlearnConfig(**change).validate()
