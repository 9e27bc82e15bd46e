"""`sau sweep`: grid expansion, analysis, resumable runs (kill + rerun), CLI and bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from sau.cli import main
from sau.errors import SAUError
from sau.lab.data import generate, write_jsonl
from sau.lab.sweep import PRESETS, Cell, Settings, Source, expand, run_sweep
from sau.lab.sweep import core as core_mod
from sau.lab.sweep import grid as grid_mod
from sau.lab.sweep.analysis import compare_fronts, derive, pareto_front
from sau.lab.sweep.run import CellRunner

TINY = Settings(
    epochs=1,
    max_epochs=2,
    batch_size=4,
    eval_retain_rows=8,
    eval_batch_size=8,
    max_new_tokens=4,
    bits=(4,),
)
TIMING = ("seconds", "eval_seconds")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory, make_tiny_lm):
    root = tmp_path_factory.mktemp("sweep-src")
    for name, seed in (("model", 2), ("retain_model", 3)):
        model, tok = make_tiny_lm(seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    ds = generate(seed=0, n_people=5, n_general=4)  # 1 forget person = 8 rows
    for split, rows in ds.splits().items():
        write_jsonl(rows, root / f"{split}.jsonl")
    return Source(
        corpus=None,
        model=str(root / "model"),
        forget=str(root / "forget.jsonl"),
        retain=str(root / "retain.jsonl"),
        holdout=str(root / "holdout.jsonl"),
        general=str(root / "general.jsonl"),
        retain_model=str(root / "retain_model"),
    )


GRID = [
    dict(sparsity=(0.5,), variant=("masked", "sau-update", "unlearn-then-prune"), lr=(1e-3,)),
    dict(sparsity=(0.5,), variant=("sau-update",), lr=(1e-3,), stop_at=("retain",)),
]


@pytest.fixture(scope="module")
def finished(source, tmp_path_factory):
    """GRID run once, uninterrupted: (output directory, SweepResult)."""
    out = tmp_path_factory.mktemp("sweep") / "whole"
    res = run_sweep(GRID, out, source=source, settings=TINY, progress=False, log=lambda m: None)
    return out, res


def _numbers(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ---- grid -------------------------------------------------------------------------


def test_expand_normalizes_shares_and_adds_dependencies():
    cells = expand([dict(sparsity=(0.3, 0.5), variant=("dense", "masked", "unlearn-then-prune"))])
    dense = [c for c in cells if c.variant == "dense"]
    assert len(dense) == 1 and dense[0].sparsity == 0.0 and dense[0].k is None
    masked = [c for c in cells if c.variant == "masked"]
    assert {(c.k, c.alpha) for c in masked} == {(1.0, 0.0)}
    refs = {(c.variant, c.sparsity) for c in cells if c.is_reference}
    assert refs == {("retain", 0.0), ("target", 0.0), ("target", 0.3), ("target", 0.5)}
    # references run first, dense before the runs that prune its model
    order = [c.variant for c in cells]
    assert order[:2] == ["retain", "target"] and order.index("dense") < order.index(
        "unlearn-then-prune"
    )


def test_alias_nm_and_keys():
    cells = expand([dict(prune=("2:4",), variant=("sau",))])
    run = [c for c in cells if not c.is_reference]
    assert [(c.variant, c.prune, c.sparsity) for c in run] == [("sau-update", "2:4", 0.5)]
    assert len({c.key() for c in cells}) == len(cells)
    assert all("/" not in c.key() and ":" not in c.key() for c in cells)


def test_paper_and_quick_presets_expand():
    assert len(expand(PRESETS["paper"])) > len(expand(PRESETS["quick"])) > 10


@pytest.mark.parametrize(
    "blocks, overrides, match",
    [
        ([{}], {"variant": ["nope"]}, "--variant 'nope'"),
        ([{}], {"sparsity": [1.0]}, r"--sparsity 1.0: expected a number in \[0, 1\)"),
        ([{}], {"prune": ["3:2"]}, "N:M needs"),
        ([{}], {"k": [0.0]}, "--k"),
        ([{"colour": (1,)}], None, "unknown grid axis 'colour'"),
        ([], None, "grid is empty"),
        ([{}], {"seed": []}, "grid is empty"),
    ],
)
def test_bad_grids_are_one_line_errors(blocks, overrides, match):
    with pytest.raises(SAUError, match=match) as err:
        expand(blocks, overrides)
    assert "\n" not in str(err.value)


def test_precision_axes_expand_to_cells_that_compute_different_things():
    cells = expand(
        [dict(variant=("dense", "masked", "sau-update"), sparsity=(0.0, 0.5))],
        {"dtype": ["float32", "bfloat16"], "rounding": ["kahan", "stochastic"],
         "state_bits": [32, 8]},
    )  # fmt: skip
    runs = {(c.variant, c.sparsity, c.dtype, c.rounding, c.state_bits) for c in cells}
    # torch AdamW takes neither setting: one dense cell per dtype
    assert {r for r in runs if r[0] == "dense"} == {
        ("dense", 0.0, "float32", None, None), ("dense", 0.0, "bfloat16", None, None),
    }  # fmt: skip
    sau = [r for r in runs if r[0] == "sau-update" and r[1] == 0.5]
    # float32 ignores the rounding: 2 state widths; bfloat16: 2 roundings x 2 widths
    assert len([r for r in sau if r[2] == "float32"]) == 2
    assert len([r for r in sau if r[2] == "bfloat16"]) == 4
    assert {(c.dtype, c.rounding) for c in cells if c.is_reference} == {
        ("float32", None), ("bfloat16", None),
    }  # fmt: skip
    assert len({c.key() for c in cells}) == len(cells)
    # masked at sparsity 0 repeats dense only where its step is torch AdamW's
    masked0 = [c for c in cells if c.variant == "masked" and c.sparsity == 0.0]
    aliased = {(c.dtype, c.state_bits) for c in masked0 if grid_mod.alias_of(c) is not None}
    assert aliased == {("float32", 32)}


def test_float32_cells_keep_their_keys_and_others_name_their_precision():
    (f32,) = [c for c in expand([dict(variant=("sau-update",))]) if not c.is_reference]
    assert f32.key() == "sau-update_seed0_magnitude0.5_graddiff_lr0.001_k0.3_a0.1"
    assert (f32.dtype, f32.rounding, f32.state_bits) == ("float32", None, 32)
    assert replace(f32, dtype="bfloat16", rounding="kahan").key() == f32.key() + "_bf16"
    other = replace(f32, dtype="bfloat16", rounding="stochastic", state_bits=8)
    assert other.key() == f32.key() + "_bf16_stochastic_state8"


@pytest.mark.parametrize(
    "axis, value, match",
    [
        ("dtype", "float16", "--dtype 'float16': expected one of float32, bfloat16"),
        ("rounding", "up", "--rounding 'up': expected one of kahan"),
        ("state_bits", 16, "--state-bits 16: expected one of 32, 8"),
        ("state_bits", 8.0, "--state-bits 8.0"),
        ("seed", -1, "--seed -1: expected an integer >= 0"),
    ],
)
def test_bad_precision_axis_values_are_one_line_errors(axis, value, match):
    with pytest.raises(SAUError, match=match):
        expand([{}], {axis: [value]})


# ---- analysis -----------------------------------------------------------------------


def test_pareto_front_and_dominance():
    a = [(0.5, -0.1), (0.8, -1.0), (0.4, -0.5)]  # (0.4, -0.5) is dominated
    assert pareto_front(a) == [(0.5, -0.1), (0.8, -1.0)]
    worse = [(0.45, -0.2), (0.7, -1.5)]
    assert compare_fronts("A", pareto_front(a), "B", worse) == "A dominates"
    crossing = [(0.3, 0.0), (0.6, -2.0)]  # better at low utility only
    text = compare_fronts("A", pareto_front(a), "B", crossing)
    assert text.startswith("cross") and "B leads at utility >= 0.30" in text


def test_derive_flags_forgetting_that_4bit_brings_back():
    base = dict(seed=0, prune="magnitude", sparsity=0.5, q8_forget_rouge=0.2)
    target = dict(base, variant="target", forget_rouge=1.0, q4_forget_rouge=1.0)
    lost = dict(base, variant="masked", forget_rouge=0.2, q4_forget_rouge=0.7)
    kept = dict(base, variant="sau-update", forget_rouge=0.2, q4_forget_rouge=0.3)
    rows = {r["variant"]: r for r in derive([target, lost, kept])}
    assert rows["masked"]["q4_forgetting_lost"] is True
    assert rows["sau-update"]["q4_forgetting_lost"] is False
    assert math.isclose(rows["masked"]["q4_recovery_forget_rouge"], 0.5)
    assert rows["target"]["q4_forgetting_lost"] is None


def test_plots_and_later_tables_take_the_precision_most_cells_use():
    from sau.lab.sweep.analysis import main_setting, precision_label, same_precision

    base = dict(seed=0, prune="magnitude", sparsity=0.5)
    sau = dict(base, variant="sau-update", k=0.3, alpha=0.1)
    rows = [
        dict(base, variant="target", dtype="bfloat16", rounding=None, state_bits=None),
        dict(sau, dtype="bfloat16", rounding="stochastic", state_bits=32),
        dict(sau, dtype="bfloat16", rounding="stochastic", state_bits=8),
        dict(sau, dtype="bfloat16", rounding="kahan", state_bits=32),
        dict(sau, dtype="float32", rounding=None, state_bits=32),
        dict(base, variant="dense", dtype="bfloat16", rounding=None, state_bits=None),
    ]
    main = main_setting(rows)
    # most rows are bfloat16 and stochastic; 32 and 8 tie: the default wins
    assert (main["dtype"], main["rounding"], main["state_bits"]) == ("bfloat16", "stochastic", 32)
    assert [same_precision(r, main) for r in rows] == [True, True, False, False, False, True]
    assert precision_label(rows[2]) == "bfloat16, stochastic, 8-bit state"
    assert precision_label(rows[4]) == precision_label({}) == "float32"  # rows of old files


# ---- running ------------------------------------------------------------------------


def test_unlearn_then_prune_counts_only_entries_it_changed_against_the_pruned_target(finished):
    _, res = finished
    rows = {r["variant"]: r for r in res.rows if r["stop_at"] == "none"}
    dense, utp = rows["dense"], rows["unlearn-then-prune"]
    # dense moves (almost) every entry; unlearn-then-prune is compared with the target
    # pruned the same way, so the entries both prunings zero (most of the 50%) never count.
    assert 0 < utp["moved"] < 0.75 * dense["moved"]
    assert 0.0 <= utp["survive_nf4"] <= 1.0 and utp["dw_bin_rtn4_p50"] > 0


def test_sweep_writes_outputs_and_a_rerun_does_no_work(source, finished, monkeypatch):
    out, res = finished
    assert res.ran == len(res.rows) > 5 and res.reused == 0
    for name in ("results.csv", "results.json", "report.md", "sweep.json"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").exists() is False  # one lr: no fronts to draw
    assert (out / "durability.png").is_file() and (out / "matched.png").is_file()
    rows = {r["key"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    header = (out / "results.csv").read_text().splitlines()[0]
    assert "q4_forget_rouge" in header and "q4_model_utility" in header
    runs = [r for r in rows.values() if r["variant"] in ("masked", "sau-update")]
    assert runs and all(r["sparsity_kept"] == 1.0 for r in runs)  # pruned stay zero
    stop = next(r for r in runs if r["stop_at"] == "retain")
    assert 1 <= stop["epochs_run"] <= TINY.max_epochs and stop["forget_rouge_per_epoch"]
    assert len([r for r in rows.values() if r["variant"] == "dense"]) == 1  # shared

    def no_work(self, cell):
        raise AssertionError(f"cell {cell.key()} ran again")

    monkeypatch.setattr(CellRunner, "run", no_work)
    again = run_sweep(GRID, out, source=source, settings=TINY, progress=False, log=lambda m: None)
    assert again.ran == 0 and again.reused == len(res.rows)
    assert _numbers(again.rows) == _numbers(res.rows)


def test_killed_sweep_resumes_to_the_uninterrupted_numbers(source, finished, tmp_path, monkeypatch):
    whole = finished[1]
    real_run, calls = CellRunner.run, []

    def dies_on_the_fifth(self, cell):
        calls.append(cell)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as a kill mid-cell: its file is never written
        return real_run(self, cell)

    monkeypatch.setattr(CellRunner, "run", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(
            GRID,
            tmp_path / "b",
            source=source,
            settings=TINY,
            progress=False,
            report=False,
            log=lambda m: None,
        )
    assert len(list((tmp_path / "b" / "cells").glob("*.json"))) == 4
    monkeypatch.setattr(CellRunner, "run", real_run)
    partial = run_sweep(
        GRID,
        tmp_path / "b",
        source=source,
        settings=TINY,
        progress=False,
        run_missing=False,
        log=lambda m: None,
    )
    assert partial.ran == 0 and len(partial.rows) == 4
    missing = len(whole.rows) - 4
    assert f"Partial: {missing} cells" in (tmp_path / "b" / "report.md").read_text()
    resumed = run_sweep(
        GRID,
        tmp_path / "b",
        source=source,
        settings=TINY,
        progress=False,
        report=False,
        log=lambda m: None,
    )
    assert resumed.ran == len(whole.rows) - 4
    assert _numbers(resumed.rows) == _numbers(whole.rows)


def test_a_changed_setting_does_not_reuse_cells(source, tmp_path):
    grid = [dict(sparsity=(0.5,), variant=("masked",))]
    run_sweep(
        grid,
        tmp_path,
        source=source,
        settings=TINY,
        progress=False,
        report=False,
        log=lambda m: None,
    )
    other = Settings(**{**TINY.to_dict(), "epochs": 2, "bits": ()})
    res = run_sweep(
        grid,
        tmp_path,
        source=source,
        settings=other,
        progress=False,
        report=False,
        log=lambda m: None,
    )
    assert res.reused == 0 and "q4_forget_rouge" not in res.rows[-1]


def test_rounding_axis_gives_one_row_per_rounding(source, tmp_path):
    """--dtype bfloat16 --rounding kahan stochastic: two masked runs with their own keys
    and rows, each recording its settings; the references are bfloat16 models too."""
    out = tmp_path / "o"
    argv = ["--sparsity", "0.5", "--variant", "masked", "--bits", "--dtype", "bfloat16"]
    assert main(_cli(source, out, *argv, "--rounding", "kahan", "stochastic")) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    runs = [r for r in rows if r["variant"] == "masked"]
    assert sorted(r["rounding"] for r in runs) == ["kahan", "stochastic"]
    assert len({r["key"] for r in runs}) == 2
    assert all(r["dtype"] == "bfloat16" and r["state_bits"] == 32 for r in runs)
    assert all(r["sparsity_kept"] == 1.0 for r in runs)
    assert {(r["variant"], r["dtype"], r["rounding"]) for r in rows if r not in runs} == {
        ("retain", "bfloat16", None), ("target", "bfloat16", None),
    }  # fmt: skip
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[9:12] == ["dtype", "rounding", "state_bits"]
    assert "bfloat16, stochastic" in (out / "report.md").read_text()


def test_a_cell_file_from_before_the_precision_settings_is_reused(source, finished, tmp_path):
    """A finished float32 cell written without dtype, rounding and state_bits keeps its
    key, is not run again, and its row gets the settings its key stands for."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(finished[0], out)
    for path in (out / "cells").glob("*.json"):
        row = json.loads(path.read_text())
        for col in ("dtype", "rounding", "state_bits"):
            row.pop(col)
        path.write_text(json.dumps(row))
    res = run_sweep(
        GRID, out, source=source, settings=TINY, progress=False, report=False,
        log=lambda m: None,
    )  # fmt: skip
    assert res.ran == 0 and res.reused == len(finished[1].rows)
    assert _numbers(res.rows) == _numbers(finished[1].rows)


# ---- command line ------------------------------------------------------------------


def _cli(source, out, *extra):
    return [
        "sweep",
        "--model",
        source.model,
        "--forget",
        source.forget,
        "--retain",
        source.retain,
        "--retain-model",
        source.retain_model,
        "--out",
        str(out),
        "--epochs",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--variant", "masked", "bogus"), "--variant 'bogus': expected one of"),
        (("--prune", "2:x"), "N:M must be two integers"),
        (("--bits", "1"), "--bits must be between 2 and 16"),
        (("--epochs", "0"), "--epochs must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line(source, tmp_path, capsys, extra, message):
    assert main(_cli(source, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_grid_that_would_not_fit_in_memory(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sau.lab.sweep.core.available_memory_bytes", lambda: 2**20)
    assert main(_cli(source, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert "GiB of memory" in err and "GiB are available" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_foreign_out_dir(source, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert main(_cli(source, tmp_path / "o")) == 2
    assert "not a sau sweep" in capsys.readouterr().err
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_quick_preset_end_to_end_and_rerun(tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "quick", tmp_path / "cache"
    argv = ["sweep", "--preset", "quick", "--out", str(out), "--cache", str(cache), "--no-progress"]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "results.csv",
        "results.json",
        "report.md",
        "degradation.png",
        "pareto.png",
        "heatmaps.png",
        "matched.png",
        "durability.png",
    } <= names
    report = (out / "report.md").read_text()
    assert "dominates" in report or "cross" in report
    capsys.readouterr()
    monkeypatch.setattr(
        CellRunner,
        "__init__",
        lambda *a, **k: (_ for _ in ()).throw(
            AssertionError("a finished grid must not load anything")
        ),
    )
    assert main(argv) == 0
    assert "0 run now" in capsys.readouterr().out


def test_cell_is_hashable_and_ordered():
    a, b = Cell(seed=0, variant="retain"), Cell(seed=0, variant="retain")
    assert a == b and len({a, b}) == 1


def test_heatmap_cells_average_only_the_seeds_every_cell_has():
    from sau.lab.sweep.plots import _common_seed_panels

    base = dict(variant="sau-update", prune="magnitude", sparsity=0.5, lr=1e-3, stop_at="none",
                method="graddiff")  # fmt: skip
    rows = [
        dict(base, k=k, alpha=a, seed=seed, model_utility=u, log10_fq=-1.0)
        for k, a, seed, u in [
            (0.1, 0.1, 0, 0.5), (0.3, 0.1, 0, 0.5), (0.1, 0.2, 0, 0.5), (0.3, 0.2, 0, 0.5),
            (0.3, 0.1, 1, 0.9),  # an extra seed for one cell only: must not be averaged in
        ]
    ]  # fmt: skip
    ((seeds, cells),) = _common_seed_panels(rows).values()
    assert seeds == [0]
    assert {c["model_utility"] for c in cells} == {0.5}


def test_a_sweep_without_quantization_writes_its_report(source, tmp_path):
    settings = Settings(**{**TINY.to_dict(), "bits": ()})
    res = run_sweep(
        [dict(sparsity=(0.5,), variant=("masked",), lr=(1e-3, 2e-3))],
        tmp_path,
        source=source,
        settings=settings,
        progress=False,
        log=lambda m: None,
    )
    assert not any(k.startswith("q") and k[1].isdigit() for r in res.rows for k in r)
    report = (tmp_path / "report.md").read_text()
    assert "no quantized evaluation" in report and "4-bit" not in report
    assert not (tmp_path / "durability.png").exists()
    assert (tmp_path / "pareto.png").is_file()


def test_masked_at_sparsity_zero_is_the_dense_cell_not_a_second_run(source, tmp_path, monkeypatch):
    grid = [dict(sparsity=(0.0,), variant=("dense", "masked", "unlearn-then-prune"), lr=(1e-3,))]
    cells = expand(grid)
    dense = next(c for c in cells if c.variant == "dense")
    for variant in ("masked", "unlearn-then-prune"):
        cell = next(c for c in cells if c.variant == variant)
        assert grid_mod.alias_of(cell) == dense
    assert (
        grid_mod.alias_of(Cell(seed=0, variant="masked", prune="magnitude", sparsity=0.5)) is None
    )
    assert grid_mod.alias_of(replace(cell, variant="sau-update", k=0.3, alpha=0.1)) is None
    unlearned = []
    original = CellRunner._unlearn
    monkeypatch.setattr(
        CellRunner, "_unlearn", lambda self, c: unlearned.append(c.variant) or original(self, c)
    )
    res = run_sweep(
        grid, tmp_path, source=source, settings=TINY, progress=False, log=lambda m: None
    )
    assert unlearned == ["dense"]  # one unlearning run for the three cells
    rows = {r["variant"]: r for r in res.rows}
    # the alias's numbers are what running masked on the unpruned model gives
    runner = CellRunner(
        core_mod._loader(source, False), TINY, tmp_path / "x", lambda c: rows.get(c.variant)
    )
    masked_cell = next(c for c in cells if c.variant == "masked")
    model, _, _ = original(runner, masked_cell)
    direct = runner._evaluate_all(model, masked_cell)
    for variant in ("masked", "unlearn-then-prune"):
        assert rows[variant]["alias_of"] == dense.key()
        for metric in ("forget_rouge", "model_utility", "forget_quality", "q4_forget_rouge"):
            assert rows[variant][metric] == rows["dense"][metric] == direct[metric]
