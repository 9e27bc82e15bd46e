"""Output directories: nothing of the user's is ever deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sau.cli import main
from sau.errors import SAUError
from sau.lab.outdir import MARKER, OutLock, check_out_dir, publish, staging_dir


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _user_dir(path):
    """A user's folder that happens to hold a results.json."""
    (path / "src").mkdir(parents=True)
    (path / "results.json").write_text("{}")
    (path / "thesis.tex").write_text("x")
    (path / "src" / "main.py").write_text("print()")
    return _tree(path)


def _one_line(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "error" in err, err
    return err


def test_demo_refuses_a_user_dir_holding_results_json(tmp_path, capsys):
    # Before: treated as an earlier sau output; thesis.tex and src/ were deleted.
    out = tmp_path / "p"
    before = _user_dir(out)
    rc = main(["demo", "--quick", "--out", str(out), "--cache", str(tmp_path / "c")])
    assert "not a sau output" in _one_line(capsys, rc)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no lock, cache, temp dirs


def test_data_command_writes_then_replaces_only_its_own_output(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "--out", str(out), "--n-people", "10"]) == 0
    listed = json.loads((out / MARKER).read_text())["files"]
    assert sorted(listed) == ["forget.jsonl", "general.jsonl", "holdout.jsonl", "retain.jsonl"]
    assert main(["data", "--out", str(out), "--n-people", "10", "--seed", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no lock or aside dir left
    (out / "notes.txt").write_text("mine")  # the user adds a file: no longer all ours
    err = _one_line(capsys, main(["data", "--out", str(out), "--n-people", "10"]))
    assert "notes.txt" in err and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["data", "prune", "unlearn"])
def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys, command):
    model = tmp_path / "m"
    model.mkdir()
    extra = {
        "data": [],
        "prune": ["--model", str(model)],
        "unlearn": ["--model", str(model), "--forget", "f", "--retain", "r"],
    }[command]
    afile = tmp_path / "file"
    afile.write_text("keep")
    err = _one_line(capsys, main([command, *extra, "--out", str(afile)]))
    assert "not a directory" in err and afile.read_text() == "keep"
    if os.geteuid() == 0:
        return  # root writes anywhere; the permission half cannot fail here
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    err = _one_line(capsys, main([command, *extra, "--out", str(locked / "out")]))
    assert "not writable" in err


def test_unwritable_cache_is_one_line(tmp_path, capsys):
    afile = tmp_path / "cachefile"
    afile.write_text("")
    rc = main(["demo", "--quick", "--out", str(tmp_path / "o"), "--cache", str(afile)])
    assert "--cache" in _one_line(capsys, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cachefile"]


def test_out_may_not_overlap_an_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for out in (model, model / "sub", tmp_path):
        with pytest.raises(SAUError, match="overlaps the input"):
            check_out_dir(out, inputs=[model])


def test_symlinked_out_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SAUError, match="symbolic link"):
        check_out_dir(tmp_path / "link")


def _publish(out, files, command="test"):
    with staging_dir(out) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
        publish(tmp, out, command=command)


def test_publish_replaces_only_listed_files(tmp_path):
    out = tmp_path / "o"
    _publish(out, {"a.txt": "1", "sub/b.txt": "2"})
    check_out_dir(out)  # an earlier sau output: accepted
    _publish(out, {"c.txt": "3"})
    assert _tree(out) == [MARKER, "c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_file_added_after_the_check_survives_publish(tmp_path):
    out = tmp_path / "o"
    _publish(out, {"a.txt": "1"})
    check_out_dir(out)
    with staging_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        (out / "late.txt").write_text("user")  # between the check and the publish
        with pytest.raises(SAUError, match="late.txt"):
            publish(tmp, out, command="test")
    assert (out / "late.txt").read_text() == "user" and (out / "a.txt").is_file()


@pytest.mark.parametrize(
    "marker",
    [
        {"kind": "sau output", "files": ["../victim.txt"]},
        {"kind": "sau output", "files": ["/etc/passwd"]},
        {"kind": "other", "files": []},
        "not json",
    ],
)
def test_a_forged_marker_cannot_reach_outside(tmp_path, marker):
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("keep")
    text = marker if isinstance(marker, str) else json.dumps(marker)
    (out / MARKER).write_text(text)
    (out / "x").write_text("x")
    with pytest.raises(SAUError):
        check_out_dir(out)
    assert (tmp_path / "victim.txt").read_text() == "keep"


def test_second_run_on_the_same_out_is_refused_naming_the_pid(tmp_path):
    # Before: two runs raced on one .partial directory; one crashed, one overwrote.
    out = tmp_path / "o"
    with OutLock(out):
        with pytest.raises(SAUError, match=f"pid {os.getpid()}"):
            with OutLock(out):
                pass
    assert not (tmp_path / ".o.lock").exists()


def test_lock_held_by_another_process_then_released_by_its_death(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from sau.lab.outdir import OutLock\n"
         f"with OutLock(Path({str(out)!r})):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SAUError, match=f"pid {holder.pid}"):
            with OutLock(out):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file with its pid stays behind
        holder.wait()
    assert (tmp_path / ".o.lock").read_text().strip() == str(holder.pid)
    with OutLock(out):  # stale: its owner is dead, so the lock is taken over
        assert (tmp_path / ".o.lock").read_text().strip() == str(os.getpid())


def test_a_symlink_as_the_lock_file_never_truncates_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".o.lock").symlink_to(victim)
    with pytest.raises(SAUError, match="cannot take the lock"):
        with OutLock(tmp_path / "o"):
            pass
    assert victim.read_text() == "precious"
