"""`sau unlearn` (one process) on hostile input, second round: the status a signal asks
for, a config.json that does not describe its weights, a run that diverges."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from sau.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"eval_retain_rows": 8, "max_new_tokens": 4, "batch_size": 4, "epochs": 2}


@pytest.fixture(scope="module")
def files(make_cli_files):
    return make_cli_files("unlearn-hostile", TINY)


def unlearn_args(files, out, *extra, model=None):
    return [
        "unlearn", "--model", str(model or files / "model"),
        "--forget", str(files / "forget.jsonl"),
        "--retain", str(files / "retain.jsonl"),
        "--config", str(files / "tiny.json"),
        "--prune", "magnitude", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def one_line(capsys, rc, code=2):
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def signal_at_step(monkeypatch, signum: int, at: int = 1):
    """Make the pipeline's loop receive `signum` at step `at` (as from kill)."""
    import sau.lab.pipeline as pipeline  # the pipeline's own reference to the loop

    real = pipeline.unlearn

    def send(step):
        if step == at:
            os.kill(os.getpid(), signum)
        return False

    monkeypatch.setattr(pipeline, "unlearn", lambda *a, **k: real(*a, **k, should_stop=send))
    return real


@pytest.mark.parametrize(
    ("signum", "status", "words"),
    [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted (SIGINT)")],
)
def test_a_signal_in_the_loop_exits_128_plus_its_number(
    files, tmp_path, monkeypatch, capsys, signum, status, words
):
    # Before: SIGTERM in the loop exited 130 "interrupted" (the flag forgot the signal).
    out = tmp_path / "out"
    real = signal_at_step(monkeypatch, signum)
    err = one_line(capsys, main(unlearn_args(files, out)), code=status)
    assert words in err and "--resume" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main's handler removed
    monkeypatch.setattr("sau.lab.pipeline.unlearn", real)
    assert main(unlearn_args(files, out, "--resume")) == 0


def model_with_config(files, tmp_path, **change):
    model = tmp_path / "model"
    shutil.copytree(files / "model", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(change)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "weights it needs"),
        ({"num_hidden_layers": 3}, "model.layers.2."),  # one random layer more
        ({"num_hidden_layers": 1}, "does not use (model.layers.1."),  # one layer dropped
    ],
)
def test_a_config_that_does_not_describe_the_weights_is_refused(
    files, tmp_path, capsys, change, words
):
    # Before: exit 0 with a re-initialized (gpt2) or extended/truncated random model.
    model = model_with_config(files, tmp_path, **change)
    err = one_line(capsys, main(unlearn_args(files, tmp_path / "o", model=model)))
    assert "config.json does not describe the weight files" in err and words in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written
    err = one_line(capsys, main(["prune", "--model", str(model), "--no-progress"]))
    assert words in err


def test_a_diverged_run_exits_1_and_leaves_nothing_to_resume(files, tmp_path, capsys):
    # Before: a ValueError traceback from model_utility, and .out.partial left behind so
    # that a plain rerun was refused ("holds an interrupted run").
    out = tmp_path / "out"
    err = one_line(capsys, main(unlearn_args(files, out, "--lr", "1e30")), code=1)
    assert "diverged" in err and "NaN or inf" in err and "lower --lr" in err
    assert list(tmp_path.iterdir()) == []  # no output, no work dir, no lock left to refuse
    assert main(unlearn_args(files, out, "--lr", "1e-3")) == 0  # a rerun just works


def test_a_starting_model_with_non_finite_outputs_is_bad_input(files, tmp_path, capsys):
    # Finite weights whose outputs overflow: not a diverged run, but a broken input.
    from sau.lab.models import load_model

    model, tok = load_model(files / "model")
    model.model.norm.weight.data.fill_(3e38)  # finite; the logits overflow to inf
    model.save_pretrained(tmp_path / "big")
    tok.save_pretrained(tmp_path / "big")
    capsys.readouterr()
    err = one_line(capsys, main(unlearn_args(files, tmp_path / "o", model=tmp_path / "big")))
    assert "the starting model" in err and "NaN or inf" in err
