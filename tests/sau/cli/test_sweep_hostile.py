"""`sau sweep` keeps the promises of the other commands under careless and hostile input:
every bad input is one line on stderr and exit 2 before anything is written, and it never
writes a file it did not write itself (README, "What is safe")."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sau.cli import main
from sau.errors import SAUError
from sau.lab.outdir import SWEEP_MARKER, check_out_dir, publish, staging_dir
from sau.lab.sweep import Settings, Source, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def src(tmp_path_factory, write_sweep_files, make_tiny_lm):
    """model/ and retain_model/ (the tiny Llama, seeds 2 and 3), the 5-person QA files,
    gpt2/ (a GPT-2 of context 100 with the same tokenizer: learned positions) and
    tiny.json (pipeline settings for `sau unlearn`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = write_sweep_files(tmp_path_factory.mktemp("sweep-hostile"))
    tok = make_tiny_lm()[1]  # the tokenizer model/ was saved with (one for every seed)
    # Every question + answer + EOS of these files fits in 100 tokens, but some question +
    # perturbed answer does not.
    cfg = GPT2Config(vocab_size=len(tok), n_positions=100, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    tiny = {"eval_retain_rows": 4, "max_new_tokens": 2, "batch_size": 4, "epochs": 1}
    (root / "tiny.json").write_text(json.dumps(tiny))
    return root


def sweep(src, out, *extra, **files):
    """`sau sweep` argv on `src` (files given as flag=path override or drop with None)."""
    paths = {
        "model": src / "model",
        "forget": src / "forget.jsonl",
        "retain": src / "retain.jsonl",
        "retain-model": src / "retain_model",
    }
    paths.update({k.replace("_", "-"): v for k, v in files.items()})
    argv = ["sweep", "--out", str(out), "--epochs", "1", "--bits", "--no-progress"]
    for flag, path in paths.items():
        argv += [f"--{flag}", str(path)] if path is not None else []
    return [*argv, "--sparsity", "0.5", "--variant", "masked", *extra]


def one_line(capsys, rc, code=2):
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "error" in err, err
    assert "Traceback" not in err
    return err


def snapshot(root):
    """{relative path: bytes or link target} of everything under `root`."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = os.readlink(path) if path.is_symlink() else (
            path.read_bytes() if path.is_file() else None
        )  # fmt: skip
    return out


# ---- the output directory ---------------------------------------------------------------


def test_a_users_sweep_json_does_not_make_a_sweep_directory(src, tmp_path, capsys):
    # Before: any file named sweep.json made "an earlier sweep", and all three were replaced.
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("sweep.json", "report.md", "results.csv"):
        (mine / name).write_text(f"my own {name}\n")
    before = snapshot(tmp_path)
    assert "not a sau sweep" in one_line(capsys, main(sweep(src, mine)))
    assert snapshot(tmp_path) == before


def test_another_commands_output_is_not_a_sweep_directory(src, tmp_path, capsys):
    # Before: `sau sweep --out` an earlier `sau unlearn` output replaced its results.json
    # and report.md.
    out = tmp_path / "unlearned"
    with staging_dir(out) as stage:
        for name in ("results.json", "report.md", "model.safetensors"):
            (stage / name).write_text(f"the unlearn run's {name}\n")
        publish(stage, out, command="unlearn")
    before = snapshot(tmp_path)
    err = one_line(capsys, main(sweep(src, out)))
    assert "output of another sau command" in err
    assert snapshot(tmp_path) == before


def test_other_commands_refuse_a_sweep_directory(src, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(sweep(src, out)) == 0
    assert (out / SWEEP_MARKER).is_file()
    with pytest.raises(SAUError, match="holds a sau sweep"):
        check_out_dir(out)


def test_a_file_the_sweep_would_write_but_did_not_is_refused(src, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(sweep(src, out)) == 0
    capsys.readouterr()
    (out / "pareto.png").write_text("my own plot")  # not written by the sweep
    before = snapshot(tmp_path)
    err = one_line(capsys, main(sweep(src, out, "--lr", "1e-3", "2e-3")))
    assert "pareto.png, which the sweep would write" in err
    assert snapshot(tmp_path) == before


def test_planted_links_in_the_directory_are_never_written_through(src, tmp_path, capsys):
    # Before: plots went through the fixed name .pareto.png.tmp.png, which matplotlib
    # followed when it was a symbolic link: a file outside the directory was overwritten.
    out, victim = tmp_path / "s", tmp_path / "victim.txt"
    victim.write_text("precious")
    argv = sweep(src, out, "--lr", "1e-3", "2e-3")
    assert main(argv) == 0
    names = ("degradation", "pareto", "heatmaps", "matched", "durability", "results", "report")
    for name in names:
        for suffix in (".png.tmp.png", ".json.tmp", ".md.tmp", ".csv.tmp"):
            (out / f".{name}{suffix}").symlink_to(victim)
    (out / "pareto.png").unlink()
    (out / "pareto.png").symlink_to(victim)  # a listed file replaced by a link
    assert main([*argv, "--report-only"]) == 0
    assert victim.read_bytes() == b"precious"
    assert (out / "pareto.png").is_file() and not (out / "pareto.png").is_symlink()


def test_symlinked_cells_directory_is_refused(src, tmp_path, capsys):
    out, elsewhere = tmp_path / "s", tmp_path / "elsewhere"
    assert main(sweep(src, out)) == 0
    capsys.readouterr()
    (out / "cells").rename(elsewhere)
    (out / "cells").symlink_to(elsewhere)
    before = snapshot(tmp_path)
    assert "cells is not a directory the sweep made" in one_line(
        capsys, main(sweep(src, out, "--lr", "2e-3"))
    )
    assert snapshot(tmp_path) == before


def test_a_directory_where_the_sweep_writes_a_file_is_refused_up_front(src, tmp_path, capsys):
    # Found in review: a listed results.json replaced by a directory failed only after the
    # new cells had run.
    out = tmp_path / "s"
    assert main(sweep(src, out)) == 0
    capsys.readouterr()
    (out / "results.json").unlink()
    (out / "results.json").mkdir()
    before = snapshot(tmp_path)
    err = one_line(capsys, main(sweep(src, out, "--lr", "2e-3")))
    assert "results.json is a directory" in err
    assert snapshot(tmp_path) == before


# ---- cell files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda row, path: path.write_text("{not json"), "unreadable cell file"),
        (lambda row, path: path.write_text("[1, 2]"), "not a JSON object"),
        (lambda row, path: path.write_text(json.dumps({**row, "variant": None})), "variant"),
        (
            lambda row, path: path.write_text(
                json.dumps(
                    {
                        k: ("x" if k == "forget_rouge" else v)
                        for k, v in row.items()
                        if k != "variant"
                    }
                )  # fmt: skip
            ),
            "forget_rouge is 'x'",
        ),
        (lambda row, path: path.write_text(json.dumps({**row, "fingerprint": "0"})), "key or"),
        (lambda row, path: path.unlink() or path.symlink_to("/etc/hostname"), "not a file this"),
    ],
)
def test_corrupt_or_foreign_cell_files_are_one_line(src, tmp_path, capsys, damage, message):
    # Before: JSONDecodeError, KeyError: 'variant' or TypeError tracebacks.
    out = tmp_path / "s"
    assert main(sweep(src, out)) == 0
    capsys.readouterr()
    (path,) = (out / "cells").glob("masked_*.json")
    damage(json.loads(path.read_text()), path)
    before = snapshot(tmp_path)
    err = one_line(capsys, main(sweep(src, out)))
    assert message in err and path.name in err
    assert snapshot(tmp_path) == before


# ---- inputs: one check path for every command ---------------------------------------------


@pytest.mark.parametrize("which", ["forget", "retain", "holdout", "general"])
def test_an_empty_qa_file_is_refused_before_any_write(src, tmp_path, capsys, which):
    (tmp_path / "empty.jsonl").write_text("")
    argv = sweep(src, tmp_path / "o", **{which: tmp_path / "empty.jsonl"})
    assert f"no QA rows in the {which} file" in one_line(capsys, main(argv))
    assert not (tmp_path / "o").exists()


def test_nan_weights_and_a_retain_model_with_another_vocabulary(src, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sau.lab.models import load_model

    model, tok = load_model(src / "model")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    small = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    small.save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    capsys.readouterr()
    err = one_line(capsys, main(sweep(src, tmp_path / "o", model=tmp_path / "nan")))
    assert "holds NaN" in err
    err = one_line(capsys, main(sweep(src, tmp_path / "o", retain_model=tmp_path / "small")))
    assert "vocabulary" in err
    assert not (tmp_path / "o").exists()


def test_a_retain_model_of_another_architecture_is_quantized_as_itself(src, tmp_path):
    # Before: its 4-bit evaluation quantized the target's layer names: AttributeError.
    long_ok = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    from sau.lab.models import load_model

    _, tok = load_model(src / "model")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2,
                               n_head=2)).save_pretrained(long_ok)  # fmt: skip
    tok.save_pretrained(long_ok)
    argv = sweep(src, tmp_path / "o", retain_model=long_ok)
    argv[argv.index("--bits") + 1 : argv.index("--bits") + 1] = ["4"]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    retain = next(r for r in rows if r["variant"] == "retain")
    assert retain["q4_forget_rouge"] is not None


@pytest.mark.parametrize("role", ["model", "retain_model"])
def test_evaluated_answers_must_fit_a_learned_position_context(src, tmp_path, capsys, role):
    # Before: question + answer fit, a perturbed answer did not: the GPT-2 evaluation
    # failed (IndexError) after the sweep had written its directory.
    err = one_line(capsys, main(sweep(src, tmp_path / "o", **{role: src / "gpt2"})))
    assert "with its perturbed answer" in err and "context of 100" in err
    assert not (tmp_path / "o").exists()


def test_question_plus_max_new_tokens_must_fit_the_context(src, tmp_path, capsys):
    # Before: max_new_tokens up to 1e9 was accepted and evaluation generated past the
    # context (90 s on the tiny model). Every command refuses it up front.
    files = {n: str(src / f"{n}.jsonl") for n in ("forget", "retain")}
    source = Source(corpus=None, model=str(src / "model"), retain_model=str(src / "retain_model"),
                    **files)  # fmt: skip
    past = Settings(epochs=1, bits=(), batch_size=8, eval_retain_rows=4, max_new_tokens=100)
    with pytest.raises(SAUError, match=r"\+ max_new_tokens \(100\) is more than the model"):
        run_sweep([{}], tmp_path / "o", source=source, settings=past, progress=False)
    argv = ["unlearn", "--model", str(src / "model"), "--forget", files["forget"]]
    argv += ["--retain", files["retain"], "--out", str(tmp_path / "u"), "--no-progress"]
    for n in (100, 10**9):
        (tmp_path / "cfg.json").write_text(json.dumps({"epochs": 1, "max_new_tokens": n}))
        err = one_line(capsys, main([*argv, "--config", str(tmp_path / "cfg.json")]))
        assert f"max_new_tokens ({n}) is more than the model's context of 128" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"]


def test_config_variants_that_leave_out_the_saved_variant_are_refused_up_front(
    src, tmp_path, capsys
):
    # Before: `sau unlearn --variant sau` with a --config of other variants ran them all,
    # then failed with KeyError: 'sau' when saving.
    cfg = {**json.loads((src / "tiny.json").read_text()), "variants": ["masked"]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    argv = ["unlearn", "--model", str(src / "model"), "--forget", str(src / "forget.jsonl")]
    argv += ["--retain", str(src / "retain.jsonl"), "--config", str(tmp_path / "cfg.json")]
    err = one_line(capsys, main([*argv, "--out", str(tmp_path / "u"), "--no-progress"]))
    assert "leave out --variant sau" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"]


# ---- refused before anything is written ---------------------------------------------------


def test_seed_too_large_for_torch_is_one_line(src, tmp_path, capsys):
    # Before: ValueError: Overflow when unpacking long long, after sweep.json and cells/.
    err = one_line(capsys, main(sweep(src, tmp_path / "o", "--seed", str(2**64))))
    assert "--seed 18446744073709551616" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "case",
    ["stop-at retain without a retain model", "bad forget file", "empty model directory"],
)
def test_bad_inputs_are_refused_before_the_directory_is_written(src, tmp_path, capsys, case):
    # Before: DIR/sweep.json and DIR/cells/ were written first.
    (tmp_path / "bad.jsonl").write_text('{"question": 1}\n')
    (tmp_path / "empty-model").mkdir()
    argv = {
        "stop-at retain without a retain model": sweep(
            src, tmp_path / "o", "--stop-at", "retain", retain_model=None
        ),
        "bad forget file": sweep(src, tmp_path / "o", forget=tmp_path / "bad.jsonl"),
        "empty model directory": sweep(src, tmp_path / "o", model=tmp_path / "empty-model"),
    }[case]
    one_line(capsys, main(argv))
    assert not (tmp_path / "o").exists()


def test_a_sweep_without_a_retain_model_reports_no_forget_quality(src, tmp_path):
    # Before: "no retain model" was refused after DIR/sweep.json and cells/ were written.
    assert main(sweep(src, tmp_path / "o", retain_model=None)) == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"target", "masked"}
    assert all(r["forget_quality"] is None for r in rows)


@pytest.mark.parametrize("case", ["cache is a file", "negative seed"])
def test_the_embedded_corpus_checks_before_training(tmp_path, capsys, monkeypatch, case):
    # Before: --cache FILE failed after DIR was written; --seed -1 trained a model first.
    import sau.lab.sweep.core as core

    monkeypatch.setattr(core, "build_default", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "cachefile").write_text("")
    argv = ["sweep", "--corpus", "quick", "--out", str(tmp_path / "o"), "--no-progress"]
    if case == "cache is a file":
        argv += ["--cache", str(tmp_path / "cachefile")]
    else:
        argv += ["--cache", str(tmp_path / "cache"), "--seed", "-1"]
    one_line(capsys, main(argv))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cachefile"]


def test_files_for_your_model_without_model_are_refused(tmp_path, capsys, monkeypatch):
    # Found in review: --forget without --model was ignored and the embedded corpus ran.
    import sau.lab.sweep.core as core

    monkeypatch.setattr(core, "build_default", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "f.jsonl").write_text('{"question": "q?", "answer": "a."}\n')
    argv = ["sweep", "--forget", str(tmp_path / "f.jsonl"), "--out", str(tmp_path / "o")]
    assert "give --model too" in one_line(capsys, main(argv))
    argv = ["sweep", "--corpus", "quick", "--model", str(tmp_path), "--out", str(tmp_path / "o")]
    assert "exclude each other" in one_line(capsys, main(argv))
    assert not (tmp_path / "o").exists()


def test_a_diverged_cell_is_one_line_and_the_finished_cells_stay(src, tmp_path, capsys):
    out = tmp_path / "s"
    err = one_line(capsys, main(sweep(src, out, "--lr", "1e308")), code=1)
    assert "masked_seed0_magnitude0.5_graddiff_lr1e+308_k1_a0 diverged" in err
    assert len(list((out / "cells").glob("*.json"))) == 3  # the retain and target rows
