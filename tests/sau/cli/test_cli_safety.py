"""The command line under careless and hostile input.

Every bad input: exit 2 and one line, no traceback, nothing written. --resume continues
only the very same run.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from sau.cli import main
from sau.lab.data import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"eval_retain_rows": 4, "max_new_tokens": 2, "batch_size": 4, "epochs": 1}


@pytest.fixture(scope="module")
def files(make_cli_files):
    return make_cli_files("safety", TINY)


def unlearn_args(files, out, *extra, forget=None):
    return [
        "unlearn", "--model", str(files / "model"),
        "--forget", str(forget or files / "forget.jsonl"),
        "--retain", str(files / "retain.jsonl"),
        "--config", str(files / "tiny.json"),
        "--prune", "magnitude", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def one_line(capsys, rc, code=2):
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "error" in err, err
    assert "Traceback" not in err
    return err


def interrupt_after_one_step(monkeypatch):
    import sau.lab.pipeline as loop  # the pipeline's own reference to the loop

    real = loop.unlearn
    monkeypatch.setattr(
        loop, "unlearn", lambda *a, **k: real(*a, **k, should_stop=lambda s: s == 1)
    )
    return real


def only_hidden_work(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


# --resume into a different run.
@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--k", "0.9"], "k: 0.3 -> 0.9"),
        (["--alpha", "2"], "alpha: 0.1 -> 2.0"),
        (["--amplify", "grad"], "amplify: update -> grad"),
        (["--sparsity", "0.7"], "sparsity: 0.5 -> 0.7"),
        (["--dtype", "bfloat16"], "dtype: float32 -> bfloat16"),
        (["--state-bits", "8"], "state_bits: 32 -> 8"),
        ("other forget file", "forget file content"),
    ],
)
def test_resume_refuses_another_run_naming_what_changed(
    files, tmp_path, monkeypatch, capsys, change, named
):
    out = tmp_path / "out"
    interrupt_after_one_step(monkeypatch)
    assert main(unlearn_args(files, out)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    if change == "other forget file":  # same length, other rows: resumed silently before
        rows = [json.loads(x) for x in (files / "forget.jsonl").read_text().splitlines()]
        other = tmp_path / "other.jsonl"
        write_jsonl([{**r, "answer": r["answer"] + " Yes."} for r in rows], other)
        argv = unlearn_args(files, out, "--resume", forget=other)
    else:
        argv = unlearn_args(files, out, "--resume", *change)
    err = one_line(capsys, main(argv))
    assert named in err and "--force" in err
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()  # kept for a real resume


# Silent loss of progress.
def test_rerun_without_resume_keeps_the_interrupted_run(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupt_after_one_step(monkeypatch)
    assert main(unlearn_args(files, out)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    ckpt = tmp_path / ".out.partial" / "checkpoints" / "sau" / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    err = one_line(capsys, main(unlearn_args(files, out)))  # before: deleted without a word
    assert "--resume" in err and "--force" in err
    assert ckpt.stat().st_mtime_ns == stamp
    assert main(unlearn_args(files, out, "--force")) == 0
    assert "--force: removed" in capsys.readouterr().err
    assert only_hidden_work(tmp_path) == ["out"]


def test_checkpoint_interval_option(files, tmp_path, monkeypatch):
    import sau.unlearn.checkpoint as ckpt

    saved = []
    real_save = ckpt.save_atomic
    monkeypatch.setattr(ckpt, "save_atomic", lambda payload, path: (
        saved.append(payload["step"]), real_save(payload, path)))  # fmt: skip
    config = tmp_path / "two.json"
    config.write_text(json.dumps({**TINY, "epochs": 2}))
    argv = unlearn_args(files, tmp_path / "o", "--checkpoint-every", "1")
    argv[argv.index("--config") + 1] = str(config)
    assert main(argv) == 0
    assert saved == [1, 2, 3, 4]  # 4 steps: every step, the last one once
    with pytest.raises(SystemExit):
        main(unlearn_args(files, tmp_path / "o", "--checkpoint-every", "0s"))


# Success that is not; and config values of the wrong type.
@pytest.mark.parametrize(
    ("setting", "expect"),
    [
        ({"retain_weight": float("nan")}, "retain_weight must be a finite number"),
        ({"epochs": 2.5}, "--epochs must be an integer"),
        ({"batch_size": "4"}, "batch_size must be an integer"),
        ({"seed": 1.5}, "--seed must be an integer"),
        ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
        ({"max_new_tokens": -1}, "max_new_tokens must be >= 1"),
        ({"w_max": float("nan")}, "w_max must be a finite number"),
        ({"quick": 1}, "quick must be true or false"),
        ({"variants": "dense"}, "variants must be a list"),
    ],
)
def test_config_values_are_validated_up_front(files, tmp_path, capsys, setting, expect):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**TINY, **setting}))
    argv = unlearn_args(files, tmp_path / "o")
    argv[argv.index("--config") + 1] = str(config)
    assert expect in one_line(capsys, main(argv))
    assert only_hidden_work(tmp_path) == ["c.json"]


@pytest.mark.parametrize(
    "flags", [["--alpha", "nan"], ["--alpha", "inf"], ["--lr", "inf"], ["--lr", "nan"]]
)
def test_non_finite_numbers_on_the_command_line(files, tmp_path, capsys, flags):
    assert flags[0] in one_line(capsys, main(unlearn_args(files, tmp_path / "o", *flags)))
    assert list(tmp_path.iterdir()) == []


def test_a_run_whose_every_loss_is_nan_fails_with_exit_1(files, tmp_path, monkeypatch, capsys):
    # Before: exit 0, "saved the unlearned model", weights unchanged.
    from sau.unlearn import objectives

    real = objectives.objective_loss
    monkeypatch.setattr(objectives, "objective_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    err = one_line(capsys, main(unlearn_args(files, tmp_path / "o")), code=1)
    assert "NaN or inf at every one" in err
    assert list(tmp_path.iterdir()) == []  # no output, no work dir


def test_a_model_with_nan_weights_is_refused_up_front_by_every_command(files, tmp_path, capsys):
    from sau.lab.models import load_model

    model, tok = load_model(files / "model")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "nanmodel")
    tok.save_pretrained(tmp_path / "nanmodel")
    capsys.readouterr()  # transformers' save progress bar, when enabled
    argv = unlearn_args(files, tmp_path / "o")
    argv[argv.index("--model") + 1] = str(tmp_path / "nanmodel")
    err = one_line(capsys, main(argv))
    assert "model.norm.weight holds NaN" in err
    assert only_hidden_work(tmp_path) == ["nanmodel"]
    # `sau sweep --model` loads through the same checks: the same line, nothing written
    sweep = ["sweep", "--model", str(tmp_path / "nanmodel"), "--out", str(tmp_path / "s")]
    sweep += ["--forget", str(files / "forget.jsonl"), "--retain", str(files / "retain.jsonl")]
    sweep_err = one_line(capsys, main([*sweep, "--no-progress"]))
    assert sweep_err.replace("sau sweep:", "sau unlearn:") == err
    prune = ["prune", "--model", str(tmp_path / "nanmodel"), "--out", str(tmp_path / "p")]
    prune_err = one_line(capsys, main([*prune, "--sparsity", "0.5", "--no-progress"]))
    assert prune_err.replace("sau prune:", "sau unlearn:") == err
    assert only_hidden_work(tmp_path) == ["nanmodel"]


# Prune --out.
def test_prune_refuses_to_overwrite_its_input_model(files, tmp_path, capsys):
    model = files / "model"
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    rc = main(["prune", "--model", str(model), "--out", str(model), "--no-progress"])
    assert "overlaps the input" in one_line(capsys, rc)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_prune_refuses_a_foreign_dir_and_writes_a_new_one(files, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("keep")
    base = ["prune", "--model", str(files / "model"), "--no-progress"]
    assert "not a sau output" in one_line(capsys, main([*base, "--out", str(mine)]))
    assert main([*base, "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "model.safetensors").is_file()
    assert main([*base, "--out", str(tmp_path / "p"), "--sparsity", "0.3"]) == 0  # ours: replaced


# Tracebacks instead of one line.
def test_corrupt_checkpoint_is_one_line_naming_it(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupt_after_one_step(monkeypatch)
    assert main(unlearn_args(files, out)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    ckpt = tmp_path / ".out.partial" / "checkpoints" / "sau" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    err = one_line(capsys, main(unlearn_args(files, out, "--resume")))
    assert str(ckpt) in err and "--force" in err


def test_truncated_safetensors_is_one_line(files, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(files / "model", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    argv = unlearn_args(files, tmp_path / "o")
    argv[argv.index("--model") + 1] = str(broken)
    assert "cannot load model" in one_line(capsys, main(argv))
    assert only_hidden_work(tmp_path) == ["broken"]


@pytest.mark.parametrize(
    "bad",
    [
        {"perturbed_answer": [1, 2]},
        {"perturbed_answer": 7},
        {"paraphrased_answer": ["x"]},
    ],
)
def test_non_string_answers_are_one_line(files, tmp_path, capsys, bad):
    rows = [{"question": "q?", "answer": "a."}, {"question": "q2?", "answer": "b.", **bad}]
    write_jsonl(rows, tmp_path / "f.jsonl")
    err = one_line(capsys, main(unlearn_args(files, tmp_path / "o", forget=tmp_path / "f.jsonl")))
    assert "f.jsonl:2" in err and next(iter(bad)) in err


def test_retain_model_with_another_vocabulary_is_one_line(files, tmp_path, capsys, make_tiny_lm):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    small.save_pretrained(tmp_path / "small")
    make_tiny_lm()[1].save_pretrained(tmp_path / "small")
    argv = unlearn_args(files, tmp_path / "o", "--retain-model", str(tmp_path / "small"))
    assert "vocabulary" in one_line(capsys, main(argv))


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--method", "wanda", "--batch-size", "0"], "--batch-size"),
        (["--calib-rows", "-1"], "--calib-rows"),
    ],
)
def test_prune_numbers_are_checked(files, tmp_path, capsys, flags, expect):
    # Before: Wanda --batch-size 0 was a traceback, --calib-rows -1 silently dropped a row.
    argv = ["prune", "--model", str(files / "model"), "--calib", str(files / "forget.jsonl")]
    assert expect in one_line(capsys, main([*argv, *flags, "--out", str(tmp_path / "o")]))
    assert list(tmp_path.iterdir()) == []


def test_failed_run_leaves_no_partial_dir(files, tmp_path, monkeypatch, capsys):
    import sau.lab.pipeline as pipeline

    def boom(*a, **k):
        raise pipeline.SAUError("evaluation failed")

    monkeypatch.setattr(pipeline, "forget_saliency", boom)  # after the work dir, before any step
    assert "evaluation failed" in one_line(capsys, main(unlearn_args(files, tmp_path / "o")))
    assert list(tmp_path.iterdir()) == []


# No bound on input size.
def test_row_longer_than_the_context_is_refused_naming_file_and_row(files, tmp_path, capsys):
    rows = [{"question": "q?", "answer": "a."}] * 2 + [{"question": "q?", "answer": "x " * 5000}]
    write_jsonl(rows, tmp_path / "long.jsonl")
    err = one_line(
        capsys, main(unlearn_args(files, tmp_path / "o", forget=tmp_path / "long.jsonl"))
    )
    assert "long.jsonl: row 3" in err and "context of 128" in err


# Smaller ones.
def test_prune_without_prunable_layers_is_refused(tmp_path, capsys, make_tiny_lm):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = make_tiny_lm()
    # No decoder block at all (GPT-2's Conv1D blocks are prunable too).
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=0, n_head=2))
    model.save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    capsys.readouterr()  # transformers' notes while building and saving the model
    rc = main(["prune", "--model", str(tmp_path / "g"), "--no-progress"])
    assert "nothing to prune" in one_line(capsys, rc)


def test_sigterm_outside_the_loop_says_the_run_is_resumable(files, tmp_path, monkeypatch, capsys):
    # Before: exit 143 with no message.
    import sau.lab.report

    def term(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sau.lab.report, "write_report", term)  # after the loop, before saving
    out = tmp_path / "out"
    assert main(unlearn_args(files, out)) == 143
    err = capsys.readouterr().err
    assert "terminated" in err and "--resume" in err
    monkeypatch.undo()
    assert main(unlearn_args(files, out, "--resume")) == 0
    assert (out / "model.safetensors").is_file()
