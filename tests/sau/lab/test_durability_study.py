"""sau.lab.durability_study: recovery columns, tables and the paired comparison."""

from __future__ import annotations

import json

import pytest

from sau.lab import durability_study as D


def _cell(variant, prune, lr, seed, forget, q4, nf4, utility, reached=True):
    key = f"{variant}_{prune}_{lr}_{seed}"
    return dict(
        key=key, variant=variant, prune=prune, lr=lr, seed=seed, reached_retain=reached,
        forget_rouge=forget, q4_forget_rouge=q4, qnf4_forget_rouge=nf4, model_utility=utility,
        dw_bin_nf4_p10=0.1, dw_bin_nf4_p50=0.5, dw_bin_nf4_p90=0.9, survive_nf4=0.4,
    )  # fmt: skip


@pytest.fixture
def runs(tmp_path):
    cells = [
        _cell("masked", "magnitude", 1e-3, 0, 0.30, 0.34, 0.36, 0.50),
        _cell("masked", "magnitude", 1e-3, 1, 0.30, 0.31, 0.30, 0.52),
        _cell("sau-update", "magnitude", 1e-3, 0, 0.30, 0.31, 0.32, 0.49),
        _cell("sau-update", "magnitude", 1e-3, 1, 0.30, 0.33, 0.29, 0.50),
        _cell("sau-update", "magnitude", 1e-4, 0, 0.40, 0.40, 0.40, 0.55, reached=False),
        _cell("masked", "magnitude", 1e-4, 0, 0.30, 0.30, 0.30, 0.55),
        _cell("dense", "none", 1e-3, 0, 0.25, 0.30, 0.27, 0.40),
    ]
    dirs = []
    for name in ("a", "b"):  # the dense cell in both runs is read once
        (tmp_path / name / "cells").mkdir(parents=True)
        dirs.append(tmp_path / name)
    for i, cell in enumerate(cells):
        (dirs[i % 2] / "cells" / f"{cell['key']}.json").write_text(json.dumps(cell))
    (dirs[1] / "cells" / "dense.json").write_text(json.dumps(cells[-1]))
    (dirs[0] / "cells" / "retain.json").write_text(json.dumps({"key": "r", "variant": None}))
    return dirs


def test_recovery_is_quantized_minus_full_precision_forget_rouge(runs):
    rows = D.load_cells(runs)
    assert len(rows) == 7
    dense = next(r for r in rows if r["variant"] == "dense")
    assert dense["recovery_q4"] == pytest.approx(0.05) and dense["recovery_qnf4"] == pytest.approx(
        0.02
    )


def test_pairs_need_both_variants_at_the_retain_level(runs):
    pairs = D.paired(D.load_cells(runs), "sau-update", "magnitude")
    assert [(p["lr"], p["seed"]) for p in pairs] == [(1e-3, 0), (1e-3, 1)]  # 1e-4: not reached
    assert pairs[0]["recovery_q4"] == pytest.approx(0.01 - 0.04)
    assert pairs[1]["recovery_qnf4"] == pytest.approx(-0.01 - 0.0)
    assert pairs[0]["model_utility"] == pytest.approx(-0.01)
    text = D.paired_table(D.load_cells(runs), ["magnitude"])
    assert "| magnitude | sau-update | 2 | -0.015 ± 0.007 | -0.005 ± 0.035 | 1/2 |" in text
    assert text.rstrip().endswith("| -0.025 ± 0.021 | 2/2 |")  # NF4: lower on both seeds


def test_tables_average_only_cells_that_reached_the_retain_level(runs):
    rows = D.load_cells(runs)
    text = D.table(rows, "magnitude", D.METRIC_COLUMNS)
    assert "| sau-update | 0.0001 | 0/1 | - |" in text
    # No prev_* columns (a sweep made before them): the stopping epoch's values, no epoch.
    assert "| masked | 0.001 | 2/2 | - | 0.510 ± 0.014 |" in text
    assert "| dense | 0.001 | 1/1 |" in text  # the unpruned model beside every method
    sizes = D.table(rows, "magnitude", D.UPDATE_COLUMNS)
    assert (
        "| masked | 0.001 | 2/2 | 0.100 ± 0.000 | 0.500 ± 0.000 | 0.900 ± 0.000 | 0.400 ± 0.000 |"
        in sizes
    )


def test_main_refuses_to_overwrite_a_summary_it_did_not_write(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("my notes\n")
    with pytest.raises(SystemExit, match="not written by this tool"):
        D.main([str(d) for d in runs] + ["--out", str(out)])
    (out / "summary.md").unlink()
    D.main([str(d) for d in runs] + ["--out", str(out)])
    assert (out / "summary.md").read_text().startswith(D.MARK)
    D.main([str(d) for d in runs] + ["--out", str(out)])  # its own file: rewritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "durability-vs-lr.png").write_bytes(b"a user's figure")
    with pytest.raises(SystemExit, match="durability-vs-lr.png exists"):
        D.main([str(d) for d in runs] + ["--out", str(other)])
    assert (other / "durability-vs-lr.png").read_bytes() == b"a user's figure"
    assert not (other / "summary.md").exists()


def _crossing(prev_epoch=3, prev_moved=100, **extra):
    row = dict(
        key="c", variant="masked", prune="magnitude", lr=1e-4, seed=0, reached_retain=True,
        retain_forget_rouge=0.30, epochs_run=prev_epoch + 1, prev_epoch=prev_epoch,
        forget_rouge=0.20, prev_forget_rouge=0.40,  # the level is halfway: t = 0.5
        model_utility=0.40, prev_model_utility=0.50,
        q4_forget_rouge=0.26, prev_q4_forget_rouge=0.42,
        qnf4_forget_rouge=0.24, prev_qnf4_forget_rouge=None,  # a missing end: no value
        dw_bin_nf4_p50=0.8, prev_dw_bin_nf4_p50=0.4 if prev_moved else None,
        survive_nf4=0.6, prev_survive_nf4=0.2 if prev_moved else None, prev_moved=prev_moved,
    )  # fmt: skip
    return {**row, **extra}


def test_a_cell_is_interpolated_to_the_retain_level_between_its_last_two_epochs(tmp_path):
    m = D.at_retain_level(_crossing())
    assert m["matched"] and m["t"] == pytest.approx(0.5) and m["epoch"] == pytest.approx(3.5)
    assert m["forget_rouge"] == pytest.approx(0.30)  # exactly the level
    assert m["model_utility"] == pytest.approx(0.45)
    assert m["q4_forget_rouge"] == pytest.approx(0.34) and m["qnf4_forget_rouge"] is None
    assert m["dw_bin_nf4_p50"] == pytest.approx(0.6) and m["survive_nf4"] == pytest.approx(0.4)
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "c.json").write_text(json.dumps(_crossing()))
    (row,) = D.load_cells([tmp_path])
    assert row["recovery_q4"] == pytest.approx(0.04)  # after RTN-4 minus the level


def test_from_the_starting_model_the_update_columns_start_at_zero():
    m = D.at_retain_level(_crossing(prev_epoch=0, prev_moved=0))
    assert m["epoch"] == pytest.approx(0.5)
    assert m["dw_bin_nf4_p50"] == pytest.approx(0.4) and m["survive_nf4"] == pytest.approx(0.3)


def test_a_starting_model_already_at_the_level_brackets_nothing():
    m = D.at_retain_level(_crossing(prev_epoch=0, prev_moved=0, prev_forget_rouge=0.25))
    assert not m["matched"] and m["forget_rouge"] == 0.20 and "epoch" not in m


def test_a_cell_that_did_not_reach_the_level_is_not_interpolated():
    m = D.at_retain_level(_crossing(reached_retain=False))
    assert not m["matched"] and m["forget_rouge"] == 0.20 and "epoch" not in m


def test_main_refuses_runs_that_mix_dtypes(runs, tmp_path):
    cell = _cell("masked", "wanda", 1e-3, 0, 0.3, 0.3, 0.3, 0.5)
    (runs[0] / "cells" / "bf16.json").write_text(json.dumps({**cell, "dtype": "bfloat16"}))
    with pytest.raises(SystemExit, match="mix dtypes"):
        D.main([str(r) for r in runs] + ["--out", str(tmp_path / "out")])
