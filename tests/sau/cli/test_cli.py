"""`sau unlearn` and `sau demo` from the command line: outputs, resume, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from sau.cli import main

# A tiny schedule and evaluation: the CLI path is what is under test, not the numbers.
TINY = {"eval_retain_rows": 8, "max_new_tokens": 4, "batch_size": 4, "epochs": 1}
ROW_KEYS = {
    "variant",
    "forget_quality",
    "model_utility",
    "forget_rouge",
    "retain_rouge",
    "mia_auc",
    "sparsity_kept",
    "seconds",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(make_cli_files):
    return make_cli_files("cli", TINY)


def args(files, out, *extra):
    return [
        "unlearn",
        "--model",
        str(files / "model"),
        "--forget",
        str(files / "forget.jsonl"),
        "--retain",
        str(files / "retain.jsonl"),
        "--holdout",
        str(files / "holdout.jsonl"),
        "--config",
        str(files / "tiny.json"),
        "--prune",
        "magnitude",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_unlearn_saves_model_and_evaluation(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(files, out, "--k", "0.5")) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "results.json",
        "report.md",
        "tradeoff.png",
    } <= names
    assert "layers.png" in names
    res = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in res["rows"]] == ["sau"]
    assert ROW_KEYS <= set(res["rows"][0])
    assert res["rows"][0]["sparsity_kept"] == 1.0  # pruned entries stayed exactly zero
    assert res["config"]["k"] == 0.5 and res["config"]["amplify"] == "update"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # work dir removed
    from sau.lab.models import load_model

    model, _ = load_model(out)
    assert model.model.layers[0].mlp.up_proj.weight.eq(0).float().mean() == 0.5
    assert "sau" in capsys.readouterr().out


# bfloat16 with stochastic rounding and 8-bit moments: the rounding stream resumes too.
PRECISION = ("--dtype", "bfloat16", "--rounding", "stochastic", "--state-bits", "8")


@pytest.mark.parametrize("precision", [(), PRECISION], ids=["float32", "bfloat16"])
def test_interrupted_unlearn_resumes_to_the_same_weights(
    files, tmp_path, monkeypatch, capsys, precision
):
    import sau.lab.pipeline as pipeline  # the pipeline's own reference to the loop
    from sau.unlearn.checkpoint import CHECKPOINT_NAME

    full = tmp_path / "full"
    assert main(args(files, full, "--epochs", "2", *precision)) == 0
    real = pipeline.unlearn
    monkeypatch.setattr(
        pipeline, "unlearn", lambda *a, **k: real(*a, **k, should_stop=lambda s: s == 1)
    )
    out = tmp_path / "out"
    assert main(args(files, out, "--epochs", "2", *precision)) == 130
    assert not out.exists()  # nothing where the user looks
    assert (tmp_path / ".out.partial" / "checkpoints" / "sau" / CHECKPOINT_NAME).is_file()
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "unlearn", real)
    assert main(args(files, out, "--epochs", "2", "--resume", *precision)) == 0
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", [["--in-backward"], ["--compact-grads"],
                                  ["--gradient-checkpointing"]])  # fmt: skip
def test_memory_options_give_the_same_model(files, tmp_path, mode):
    """Stepping inside backward (a one-pass method: ga), keeping grad[G] only, and
    recomputing activations change memory, not the model (bitwise)."""
    plain, other = tmp_path / "plain", tmp_path / "other"
    assert main(args(files, plain, "--epochs", "1", "--method", "ga")) == 0
    assert main(args(files, other, "--epochs", "1", "--method", "ga", *mode)) == 0
    config = json.loads((other / "results.json").read_text())["config"]
    assert config[mode[0][2:].replace("-", "_")] is True
    from safetensors.torch import load_file

    a, b = load_file(plain / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_in_backward_with_two_forward_passes_is_refused(files, tmp_path, capsys):
    rc = main(args(files, tmp_path / "o", "--epochs", "1", "--method", "graddiff",
                   "--in-backward"))  # fmt: skip
    err = _one_line_error(capsys, rc)
    assert "--joint-forward" in err and "graddiff" in err
    rc = main(args(files, tmp_path / "p", "--in-backward", "--compact-grads"))
    assert "exclude each other" in _one_line_error(capsys, rc)


def test_joint_forward_option_gives_a_close_model(files, tmp_path):
    plain, joint = tmp_path / "plain", tmp_path / "joint"
    assert main(args(files, plain, "--epochs", "1")) == 0
    assert main(args(files, joint, "--epochs", "1", "--in-backward", "--joint-forward")) == 0
    assert json.loads((joint / "results.json").read_text())["config"]["joint_forward"] is True
    from safetensors.torch import load_file

    a, b = load_file(plain / "model.safetensors"), load_file(joint / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # one forward over [forget; retain]: the same loss up to rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "error" in err
    return err


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"--forget": "missing.jsonl"}, "no such file"),
        ({"--retain": "bad.jsonl"}, "bad.jsonl:2"),
        ({"--model": "noweights"}, "no weights"),
        ({"--sparsity": "1.0"}, "sparsity"),
        ({"--k": "0"}, "--k"),
        ({"--k": "1.5"}, "--k"),
        ({"--config": "broken.json"}, "invalid JSON"),
    ],
)
def test_bad_inputs_give_one_line_and_write_nothing(files, tmp_path, capsys, change, expect):
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    (tmp_path / "broken.json").write_text("{")
    argv = args(files, tmp_path / "out")
    for flag, value in change.items():
        path = tmp_path / value
        value = str(path) if path.exists() or value.endswith(".jsonl") else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    err = _one_line_error(capsys, main(argv))
    assert expect in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "broken.json", "noweights"]


def test_unlearn_refuses_a_foreign_out_dir(files, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    err = _one_line_error(capsys, main(args(files, out)))
    assert "not a sau output" in err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("argv", [["demo", "--sparsity", "1.5"], ["demo", "--k", "-1"]])
def test_demo_bad_settings_fail_before_any_work(tmp_path, capsys, argv):
    out = tmp_path / "demo"
    rc = main(argv + ["--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress"])
    _one_line_error(capsys, rc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["demo", "unlearn"])
def test_help_explains_every_option(command, capsys):
    from sau.cli.main import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        ["demo", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress"]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in res["rows"]] == [
        "dense",
        "masked",
        "sau-grad",
        "sau-update",
        "unlearn-then-prune",
    ]
    for row in res["rows"]:
        assert ROW_KEYS <= set(row)
    # Pruning after unlearning picks its own mask; only the unlearn-on-pruned rows keep it.
    kept = {r["variant"]: r["sparsity_kept"] for r in res["rows"]}
    assert kept["masked"] == kept["sau-grad"] == kept["sau-update"] == 1.0
    assert (out / "report.md").is_file() and (out / "tradeoff.png").is_file()
    assert "sau-update" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "unlearn", "sweep"])
@pytest.mark.parametrize(
    "option, good, bad",
    [
        ("--dtype", ["float32", "bfloat16"], "float16"),
        ("--rounding", ["kahan", "stochastic", "nearest"], "up"),
        ("--state-bits", [32, 8], 16),
    ],
)
def test_precision_options_take_their_choices_only(command, option, good, bad, capsys):
    from sau.cli.main import build_parser

    required = {
        "demo": [],
        "unlearn": ["--model", "m", "--forget", "f", "--retain", "r", "--out", "o"],
        "sweep": ["--out", "o"],  # a grid axis: any number of values
    }[command]
    parser = build_parser()
    dest = option[2:].replace("-", "_")
    for value in good:
        got = getattr(parser.parse_args([command, *required, option, str(value)]), dest)
        assert got == ([value] if command == "sweep" else value)
    if command == "sweep":
        both = parser.parse_args([command, *required, option, *map(str, good)])
        assert getattr(both, dest) == good
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([command, *required, option, str(bad)])
    assert exc.value.code == 2
    assert f"argument {option}: invalid choice: " in capsys.readouterr().err


def test_unlearn_in_bfloat16_saves_a_bfloat16_model_and_records_its_settings(files, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    assert main(args(files, out, *PRECISION)) == 0
    res = json.loads((out / "results.json").read_text())
    settings = ("dtype", "rounding", "state_bits")
    assert [res["config"][k] for k in settings] == ["bfloat16", "stochastic", 8]
    (row,) = res["rows"]
    assert [row[k] for k in settings] == ["bfloat16", "stochastic", 8]
    assert row["sparsity_kept"] == 1.0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_demo_path_in_bfloat16(files, tmp_path, monkeypatch, capsys):
    """`sau demo --dtype bfloat16` on a stand-in for the embedded default: every variant
    runs on bfloat16 models, and results.json says so."""
    import sau.lab.models
    from tests.helpers import stand_in_default

    monkeypatch.setattr(sau.lab.models, "build_default", lambda *a, **k: stand_in_default(files))
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main([*argv, "--config", str(files / "tiny.json"), "--dtype", "bfloat16"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["dtype"] == "bfloat16"
    assert [r["variant"] for r in res["rows"]] == [
        "dense", "masked", "sau-grad", "sau-update", "unlearn-then-prune",
    ]  # fmt: skip
    for row in res["rows"] + res["reference"]:
        assert row["dtype"] == "bfloat16" and ROW_KEYS <= set(row)
    kahan = {r["variant"]: r["rounding"] for r in res["rows"]}
    assert kahan == {
        "dense": None, "masked": "kahan", "sau-grad": "kahan", "sau-update": "kahan",
        "unlearn-then-prune": None,
    }  # fmt: skip
    assert "sau-update" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, size",
    [("1MiB", 2**20), ("4GiB", 4 * 2**30), ("512mib", 512 * 2**20), ("1e9", 10**9),
     ("1.5kB", 1500), ("8192", 8192), ("2 GB", 2 * 10**9)],
)  # fmt: skip
def test_saliency_memory_takes_sizes(text, size):
    from sau.cli.main import build_parser

    required = ["--model", "m", "--forget", "f", "--retain", "r", "--out", "o"]
    got = build_parser().parse_args(["unlearn", *required, "--saliency-memory", text])
    assert got.saliency_memory == size


@pytest.mark.parametrize("bad", ["0", "-1", "0.5", "abc", "4XB", "nan", "inf", "1e99", ""])
def test_saliency_memory_refuses_what_is_not_a_size(bad, capsys):
    from sau.cli.main import build_parser

    required = ["--model", "m", "--forget", "f", "--retain", "r", "--out", "o"]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["unlearn", *required, "--saliency-memory", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --saliency-memory: expected a size" in err and "4GiB" in err


def test_saliency_memory_gives_the_same_model_and_resumes_without_it(
    files, tmp_path, monkeypatch, capsys
):
    """A run with --saliency-memory (8 KiB: 10 passes) saves the plain run's model; the
    setting is out of the fingerprint, so an interrupted run resumes without it."""
    import sau.lab.pipeline as pipeline  # the pipeline's own reference to the loop

    plain = tmp_path / "plain"
    assert main(args(files, plain, "--epochs", "2")) == 0
    real = pipeline.unlearn
    monkeypatch.setattr(
        pipeline, "unlearn", lambda *a, **k: real(*a, **k, should_stop=lambda s: s == 1)
    )
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(args(files, out, "--epochs", "2", "--saliency-memory", "8KiB")) == 130
    assert "saliency: 10 pass(es)" in capsys.readouterr().out
    monkeypatch.setattr(pipeline, "unlearn", real)
    assert main(args(files, out, "--epochs", "2", "--resume")) == 0
    from safetensors.torch import load_file

    a, b = load_file(plain / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --eval-protocol open-unlearning: its files, its JSON.
OU_FILES = ("--retain-perturbed", "retain.jsonl", "--real-authors", "general.jsonl")


def test_eval_protocol_option_parses(capsys):
    from sau.cli.main import build_parser

    required = ["--model", "m", "--forget", "f", "--retain", "r", "--out", "o"]
    assert build_parser().parse_args(["unlearn", *required]).eval_protocol == "sau"
    got = build_parser().parse_args(["unlearn", *required, "--eval-protocol", "open-unlearning"])
    assert got.eval_protocol == "open-unlearning"
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["unlearn", *required, "--eval-protocol", "tofu"])
    assert exc.value.code == 2 and "--eval-protocol" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (("--eval-protocol", "open-unlearning", *OU_FILES), "needs --world-facts FILE"),
        (("--eval-protocol", "open-unlearning", *OU_FILES, "--world-facts", "nope.jsonl"),
         "no such file"),
        (("--real-authors", "general.jsonl"), "only with --eval-protocol open-unlearning"),
    ],
)  # fmt: skip
def test_open_unlearning_protocol_refuses_a_missing_file_in_one_line(
    files, tmp_path, capsys, extra, expect
):
    extra = [str(files / e) if e.endswith(".jsonl") else e for e in extra]
    err = _one_line_error(capsys, main(args(files, tmp_path / "out", *extra)))
    assert expect in err
    assert list(tmp_path.iterdir()) == []


def test_unlearn_with_open_unlearning_protocol_writes_its_eval_json(files, tmp_path, capsys):
    retain_logs = tmp_path / "retain_TOFU_EVAL.json"
    scores = {str(i): {"score": 0.2 * (i + 1)} for i in range(5)}
    retain_logs.write_text(json.dumps({"forget_truth_ratio": {"value_by_index": scores}}))
    out = tmp_path / "out"
    extra = [str(files / e) if e.endswith(".jsonl") else e for e in OU_FILES]
    extra += ["--world-facts", str(files / "general.jsonl"), "--retain-logs", str(retain_logs)]
    assert main(args(files, out, "--eval-protocol", "open-unlearning", *extra)) == 0
    logs = json.loads((out / "TOFU_EVAL.json").read_text())
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    assert {"model_utility", "forget_quality", "forget_truth_ratio", "privleak"} <= set(summary)
    assert summary["model_utility"] == logs["model_utility"]["agg_value"]
    assert len(logs["forget_truth_ratio"]["value_by_index"]) == 8  # every forget row
    assert "open-unlearning protocol: " in capsys.readouterr().out
    assert (out / "results.json").exists()  # our protocol's numbers stay beside it
