"""A planted pickle as every file sau loads: it is refused (one line, exit 2), never run.

The payload's unpickling would create MARK (builtins.open(MARK, "w")); each test first
proves the payload is live (plain pickle.load runs it), then runs the command and checks
that MARK does not exist. Files sau loads: model directories (weights, config, tokenizer),
the retain model, QA files, --config, --calib, a checkpoint and the run fingerprint on
--resume, the output marker, the lock file, and the demo's model cache.
"""

from __future__ import annotations

import io
import pickle
import shutil

import pytest
import torch

from sau.cli import main
from sau.lab.data import generate

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"eval_retain_rows": 4, "max_new_tokens": 2, "batch_size": 4, "epochs": 1}


class Payload:
    """Unpickling this calls open(path, "w"): the file's existence proves code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path, mark, fmt="torch"):
    """Write a pickle at `path`: torch.save's zip format, or a bare pickle stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        torch.save({"weights": Payload(mark)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(mark)))


@pytest.fixture
def mark(tmp_path):
    return tmp_path / "PWNED"


@pytest.fixture(scope="module")
def files(make_cli_files):
    return make_cli_files("hostile", TINY)


def test_the_payload_is_live(tmp_path, mark):
    # Without this the tests below could pass with a dud payload.
    plant(tmp_path / "p.pt", mark)
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert mark.exists()
    mark.unlink()
    plant(tmp_path / "p.pkl", mark, fmt="pickle")
    pickle.load(io.BytesIO((tmp_path / "p.pkl").read_bytes()))
    assert mark.exists()


def unlearn_args(files, out, **over):
    paths = {
        "--model": files / "model",
        "--forget": files / "forget.jsonl",
        "--retain": files / "retain.jsonl",
        "--config": files / "tiny.json",
    }
    paths.update(over)
    argv = ["unlearn", "--out", str(out), "--no-progress", "--prune", "magnitude"]
    for flag, path in paths.items():
        argv += [flag, str(path)]
    return argv


def refused(capsys, rc, mark):
    err = capsys.readouterr().err.strip()
    assert not mark.exists(), "the planted pickle ran"
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def model_copy(files, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(files / "model", dst)
    return dst


@pytest.mark.parametrize(
    "target",
    ["pytorch_model.bin", "model.safetensors", "config.json", "tokenizer.json"],
)
def test_pickle_in_the_model_directory(files, tmp_path, capsys, mark, target):
    model = model_copy(files, tmp_path)
    if target == "pytorch_model.bin":
        (model / "model.safetensors").unlink()  # the only weights: a pickled .bin
    plant(model / target, mark)
    refused(capsys, main(unlearn_args(files, tmp_path / "o", **{"--model": model})), mark)
    prune = ["prune", "--model", str(model), "--no-progress"]
    if target == "tokenizer.json":
        # Magnitude pruning never reads the tokenizer; Wanda needs it.
        assert main(prune) == 0 and not mark.exists()
        capsys.readouterr()
        calib = files / "forget.jsonl"
        prune += ["--method", "wanda", "--calib", str(calib)]
    refused(capsys, main(prune), mark)


def test_pickle_as_the_retain_model(files, tmp_path, capsys, mark):
    retain = model_copy(files, tmp_path, "r")
    (retain / "model.safetensors").unlink()
    plant(retain / "pytorch_model.bin", mark)
    argv = unlearn_args(files, tmp_path / "o") + ["--retain-model", str(retain)]
    refused(capsys, main(argv), mark)


@pytest.mark.parametrize("flag", ["--forget", "--retain", "--config", "--holdout", "--general"])
@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_pickle_as_a_data_or_config_file(files, tmp_path, capsys, mark, flag, fmt):
    plant(tmp_path / "planted", mark, fmt)
    argv = unlearn_args(files, tmp_path / "o", **{flag: tmp_path / "planted"})
    refused(capsys, main(argv), mark)


def test_pickle_as_wanda_calibration(files, tmp_path, capsys, mark):
    plant(tmp_path / "calib.jsonl", mark, "pickle")
    argv = ["prune", "--model", str(files / "model"), "--method", "wanda"]
    refused(capsys, main([*argv, "--calib", str(tmp_path / "calib.jsonl")]), mark)


def _interrupted_run(files, out, monkeypatch, capsys):
    import sau.lab.pipeline as loop  # the pipeline's own reference to the loop

    real = loop.unlearn
    monkeypatch.setattr(
        loop, "unlearn", lambda *a, **k: real(*a, **k, should_stop=lambda s: s == 1)
    )
    assert main(unlearn_args(files, out)) == 130
    monkeypatch.setattr(loop, "unlearn", real)
    capsys.readouterr()
    return out.parent / f".{out.name}.partial"


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_pickle_as_the_checkpoint_on_resume(files, tmp_path, monkeypatch, capsys, mark, fmt):
    # Before: torch.load(weights_only=False) ran it.
    work = _interrupted_run(files, tmp_path / "out", monkeypatch, capsys)
    plant(work / "checkpoints" / "sau" / "checkpoint.pt", mark, fmt)
    err = refused(capsys, main(unlearn_args(files, tmp_path / "out") + ["--resume"]), mark)
    assert "checkpoint.pt" in err


def test_pickle_as_the_run_fingerprint(files, tmp_path, monkeypatch, capsys, mark):
    work = _interrupted_run(files, tmp_path / "out", monkeypatch, capsys)
    plant(work / "fingerprint.json", mark, "pickle")
    err = refused(capsys, main(unlearn_args(files, tmp_path / "out") + ["--resume"]), mark)
    assert "fingerprint.json" in err


def test_pickle_as_the_output_marker(files, tmp_path, capsys, mark):
    out = tmp_path / "out"
    out.mkdir()
    plant(out / ".sau-output.json", mark, "pickle")
    (out / "report.md").write_text("whose?")
    refused(capsys, main(unlearn_args(files, out)), mark)
    assert (out / "report.md").read_text() == "whose?"


def test_pickle_as_the_lock_file(tmp_path, capsys, mark):
    # Read only to tell a pid from anything else; not a pid: refused and left as it is.
    plant(tmp_path / ".d.lock", mark, "pickle")
    before = (tmp_path / ".d.lock").read_bytes()
    err = refused(capsys, main(["data", "--out", str(tmp_path / "d"), "--n-people", "10"]), mark)
    assert "not a sau lock file" in err and (tmp_path / ".d.lock").read_bytes() == before


def test_pickle_in_the_demo_model_cache(files, tmp_path, monkeypatch, capsys, mark):
    # The demo loads its cached models with the same loader; a pickled .bin planted in a
    # cache entry is refused (the entry is faked here: training one takes a minute).
    import sau.lab.models
    from sau.lab.models.default import DefaultArtifacts

    entry = tmp_path / "cache" / "default-x"
    for name in ("target", "retain"):
        model_copy(files, entry, name)
    (entry / "target" / "model.safetensors").unlink()
    plant(entry / "target" / "pytorch_model.bin", mark)
    art = DefaultArtifacts(generate(seed=0, n_people=5, n_general=4), entry, entry / "data",
                           entry / "target", entry / "retain", {})  # fmt: skip
    monkeypatch.setattr(sau.lab.models, "build_default", lambda *a, **k: art)
    rc = main(["demo", "--quick", "--cache", str(entry.parent), "--out", str(tmp_path / "o")])
    refused(capsys, rc, mark)
