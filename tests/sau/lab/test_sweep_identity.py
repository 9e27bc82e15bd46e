"""What makes two sweep cells the same cell: the content of the inputs, exact numbers,
fingerprinted shared weights; and the settings that are not part of it (--compact-grads,
--gradient-checkpointing)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from sau.errors import SAUError
from sau.lab.data import write_jsonl
from sau.lab.sweep import Cell, Settings, Source, expand, run_sweep
from sau.lab.sweep.grid import number_label

TINY = Settings(
    epochs=1,
    max_epochs=2,
    batch_size=4,
    eval_retain_rows=8,
    eval_batch_size=8,
    max_new_tokens=4,
    bits=(),
)
TIMING = ("seconds", "eval_seconds")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def source(tmp_path, write_sweep_files):
    """A fresh copy per test: some tests change the model in place."""
    root = write_sweep_files(tmp_path / "src")
    return Source(
        corpus=None,
        model=str(root / "model"),
        forget=str(root / "forget.jsonl"),
        retain=str(root / "retain.jsonl"),
        holdout=str(root / "holdout.jsonl"),
        general=str(root / "general.jsonl"),
        retain_model=str(root / "retain_model"),
    )


def _sweep(grid, out, source, settings=TINY, **kw):
    return run_sweep(grid, out, source=source, settings=settings, progress=False,
                     log=lambda m: None, **kw)  # fmt: skip


def _numbers(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_new_weights_at_the_same_path_are_new_cells(source, tmp_path, make_tiny_lm):
    # Before: cells were keyed by the paths' text, so the old cells were reused.
    grid = [dict(sparsity=(0.5,), variant=("masked",))]
    first = _sweep(grid, tmp_path / "o", source)
    model, tok = make_tiny_lm(seed=7)
    model.save_pretrained(source.model)  # other weights, same directory
    again = _sweep(grid, tmp_path / "o", source)
    assert again.reused == 0 and again.ran == first.ran
    assert _numbers(again.rows) != _numbers(first.rows)
    # and a changed QA file too
    rows = [json.loads(line) for line in open(source.forget)]
    write_jsonl(rows[:-1], source.forget)
    assert _sweep(grid, tmp_path / "o", source).reused == 0


def test_numbers_that_differ_get_keys_and_labels_that_differ(source, tmp_path):
    # Before: {:g} keys: --lr 1e-3 1.0000001e-3 made 5 cells but 4 files.
    assert number_label(1e-3) == "0.001" and number_label(0.0) == "0"
    assert number_label(1.0000001e-3) == "0.0010000001" and number_label(3) == "3"
    a = Cell(seed=0, variant="masked", prune="magnitude", sparsity=0.5, method="ga", lr=1e-3)
    b = Cell(seed=0, variant="masked", prune="magnitude", sparsity=0.5, method="ga",
             lr=1.0000001e-3)  # fmt: skip
    assert a.key() != b.key() and a.key().endswith("lr0.001")  # the old key, unchanged
    grid = [dict(sparsity=(0.5,), variant=("masked",), lr=(1e-3, 1.0000001e-3))]
    res = _sweep(grid, tmp_path / "o", source)
    assert len(expand(grid)) == 5 == len(list((tmp_path / "o" / "cells").glob("*.json")))
    assert len({r["key"] for r in res.rows}) == 5
    masked = [r for r in res.rows if r["variant"] == "masked"]
    assert sorted(r["lr"] for r in masked) == [1e-3, 1.0000001e-3]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| 0.001 |" in report and "| 0.0010000001 |" in report


def test_a_signed_zero_is_the_same_cell_with_the_same_key():
    # Found in review: --sparsity -0.0 gave a cell keyed "none-0" beside "none0".
    plain = expand([dict(sparsity=(0.0,), variant=("masked", "sau-update"), alpha=(0.0,))])
    signed = expand([dict(sparsity=(-0.0,), variant=("masked", "sau-update"), alpha=(-0.0,))])
    assert [c.key() for c in signed] == [c.key() for c in plain]
    assert not any("-0" in c.key() for c in signed)


def test_shared_dense_weights_belong_to_their_settings(source, tmp_path):
    # Before: shared/<key>.safetensors had no fingerprint: after a 2-epoch sweep in the
    # same directory, the 1-epoch sweep pruned the 2-epoch dense weights.
    dense = [dict(variant=("dense",))]
    both = [dict(sparsity=(0.5,), variant=("dense", "unlearn-then-prune"))]
    two = replace(TINY, epochs=2)
    out = tmp_path / "o"
    _sweep(dense, out, source)
    _sweep(dense, out, source, settings=two)
    mixed = _sweep(both, out, source)
    assert len(list((out / "shared").glob("*.safetensors"))) == 2
    fresh = _sweep(both, tmp_path / "fresh", source)

    def utp(res):
        return _numbers([r for r in res.rows if r["variant"] == "unlearn-then-prune"])

    assert utp(mixed) == utp(fresh)


def test_tampered_shared_weights_are_one_line(source, tmp_path):
    out, other = tmp_path / "o", tmp_path / "other"
    _sweep([dict(variant=("dense",))], out, source)
    _sweep([dict(variant=("dense",))], other, source, settings=replace(TINY, epochs=2))
    (path,) = (out / "shared").glob("*.safetensors")
    (theirs,) = (other / "shared").glob("*.safetensors")
    grid = [dict(sparsity=(0.5,), variant=("unlearn-then-prune",))]
    for planted in (b"not safetensors", theirs.read_bytes()):  # garbage; another sweep's
        path.write_bytes(planted)
        with pytest.raises(SAUError, match="delete it"):
            _sweep(grid, out, source)


def test_memory_and_checkpointing_flags_give_the_same_rows_and_share_cells(
    source, tmp_path, monkeypatch
):
    from sau.lab.sweep import run as run_mod

    seen = []  # (compact_grads, checkpointing) of every optimizer / unlearning run

    def spy(name, key):
        real = getattr(run_mod, name)

        def wrapper(*args, **kwargs):
            seen.append((name, kwargs.get(key, args[1] if len(args) > 1 else True)))
            return real(*args, **kwargs)

        monkeypatch.setattr(run_mod, name, wrapper)

    spy("build_optimizer", "compact_grads")
    spy("activation_checkpointing", "enabled")
    grid = [
        dict(sparsity=(0.5,), variant=("masked", "sau-update", "dense")),
        dict(sparsity=(0.5,), variant=("sau-update",), stop_at=("retain",)),
    ]
    flags = replace(TINY, compact_grads=True, gradient_checkpointing=True)
    plain = _sweep(grid, tmp_path / "plain", source)
    assert seen and not any(on for _, on in seen)
    seen.clear()
    with_flags = _sweep(grid, tmp_path / "flags", source, settings=flags)
    assert len(seen) == 8 and all(on for _, on in seen)  # 4 runs, both flags on in each
    assert with_flags.ran == plain.ran > 5
    assert _numbers(with_flags.rows) == _numbers(plain.rows)
    meta = json.loads((tmp_path / "flags" / "sweep.json").read_text())
    assert meta["settings"]["compact_grads"] is True  # recorded, yet not in the identity
    assert (
        meta["fingerprint"]
        == json.loads((tmp_path / "plain" / "sweep.json").read_text())["fingerprint"]
    )
    assert _sweep(grid, tmp_path / "plain", source, settings=flags).ran == 0


def test_a_copied_sweep_directory_is_resumed(source, tmp_path):
    grid = [dict(sparsity=(0.5,), variant=("masked",))]
    _sweep(grid, tmp_path / "a", source)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert _sweep(grid, tmp_path / "b", source).ran == 0
