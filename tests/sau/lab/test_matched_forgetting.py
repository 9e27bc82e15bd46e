"""sau.lab.matched_report: the interpolation: the crossing of the retain level, the
4-bit metrics taken at the same point, a sweep's results.json read as its rows, and the
4-bit utility paired with masked's by seed."""

from __future__ import annotations

import json
import math

import pytest

from sau.lab import matched_report as mf


def _row(lr, rouge, utility, fq=0.1, **extra):
    return dict(
        variant="masked", seed=0, prune="magnitude", lr=lr, forget_rouge=rouge,
        model_utility=utility, forget_quality=fq, mia_auc=0.5, retain_rouge=1.0, **extra,
    )  # fmt: skip


def test_crossing_interpolates_in_log_lr_and_takes_4bit_at_the_same_point():
    pts = [(1e-3, _row(1e-3, 0.8, 0.6)), (2e-3, _row(2e-3, 0.4, 0.5)), (4e-3, _row(4e-3, 0.1, 0.2))]

    def quant(lr, rouge, utility, q_rouge, q_utility, q_fq):
        return _row(
            lr, rouge, utility, q4_forget_rouge=q_rouge, q4_model_utility=q_utility,
            q4_forget_quality=q_fq,
        )  # fmt: skip

    q4 = {
        2e-3: quant(2e-3, 0.4, 0.5, 0.5, 0.45, 1e-2),
        4e-3: quant(4e-3, 0.1, 0.2, 0.1, 0.15, 1e-4),
    }
    assert mf.bracket(pts, 0.3) == (1, pytest.approx(1 / 3))
    out = mf.crossing(pts, 0.3, q4)
    assert out["lr"] == pytest.approx(math.exp(math.log(2e-3) + math.log(2) / 3))
    assert out["model_utility"] == pytest.approx(0.5 - 0.3 / 3)
    assert out["q4_forget_rouge"] == pytest.approx(0.5 - 0.4 / 3)
    assert out["q4_recovery"] == pytest.approx(0.5 - 0.4 / 3 - 0.3)
    assert out["q4_log10_fq"] == pytest.approx(-2 - 2 / 3)
    assert out["q4_utility_change"] == pytest.approx((0.45 - 0.1) - (0.5 - 0.1))
    # a bracket whose point lacks a 4-bit row gives no 4-bit numbers, never a guess
    low = mf.crossing(pts, 0.6, q4)
    assert low["q4_forget_rouge"] is None and "q4_recovery" not in low
    assert mf.crossing(pts, 0.05) is None  # never reached within the grid


def test_sweep_results_json_reads_as_run_level_and_quantized_rows(tmp_path):
    rows = [
        dict(variant="retain", seed=0, prune="none", lr=None, stop_at="none", forget_rouge=0.3),
        dict(variant="target", seed=0, prune="magnitude", lr=None, stop_at="none"),
        {**_row(1e-3, 0.5, 0.5), "stop_at": "none", "q4_forget_rouge": 0.55},
        {**_row(3e-3, 0.2, 0.4), "stop_at": "retain"},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": rows}))
    got = mf.read_rows([path])
    assert [r["variant"] for r in got] == ["retain model", "masked", "masked"]
    assert "q4_forget_rouge" not in got[1] and got[2]["q4_forget_rouge"] == 0.55
    level, grid, quantized = mf.grid_of(got)
    assert level == {0: 0.3} and list(grid) == [("magnitude", 0, "masked")]
    assert list(quantized[("magnitude", 0, "masked")]) == [1e-3]


def test_q4_paired_diffs_only_seeds_where_both_have_4bit_metrics():
    def hit(q_utility):
        return {"model_utility": 0.5, "q4_model_utility": q_utility}

    table = {
        ("wanda", 1.0, "masked"): {0: hit(0.50), 1: hit(0.40), 2: hit(0.30), 3: None},
        ("wanda", 1.0, "sau-update"): {0: hit(0.52), 1: hit(0.37), 2: hit(None), 3: hit(0.9)},
    }
    # seed 2 lacks a 4-bit value and seed 3 has no masked crossing: both are left out
    assert mf.q4_paired(table, "wanda", 1.0, "sau-update") == pytest.approx([0.02, -0.03])
    assert mf._q4_vs_masked(table, "wanda", 1.0, "sau-update") == "-0.005 ± 0.035 (1/2)"
    assert mf._q4_vs_masked(table, "wanda", 1.0, "masked") == "-"


def test_quantized_takes_the_sweeps_corpus_and_settings_and_refuses_a_mismatch(tmp_path):
    from sau.lab import matched_forgetting as runner

    def sweep(name, corpus, epochs=5):
        meta = {"source": {"corpus": corpus}, "settings": {"epochs": epochs, "bits": []}}
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"meta": meta, "rows": []}))
        return str(path)

    a, b = sweep("a", "tofu"), sweep("b", "tofu")
    assert runner._source_of([a, b], None) == ("tofu", {"epochs": 5, "bits": ()})
    assert runner._source_of([a], "tofu")[0] == "tofu"
    assert runner._source_of([str(tmp_path / "run.jsonl")], None) == ("default", {})
    with pytest.raises(SystemExit, match="not 'default'"):
        runner._source_of([a], "default")
    with pytest.raises(SystemExit, match="differ"):
        runner._source_of([a, sweep("c", "tofu", epochs=3)], None)
