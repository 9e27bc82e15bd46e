"""run_pipeline on a tiny model (fast lane): several variants at once, unlearn-then-prune
on the dense variant it depends on, and the prune="none" branch (an already pruned model);
PipelineConfig: N:M pruning is a setting a config file can give."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sau.errors import SAUError
from sau.lab.data import generate
from sau.lab.eval import evaluate_model
from sau.lab.inputs import Inputs
from sau.lab.pipeline import PipelineConfig, load_config_file, run_pipeline
from sau.prune import prune_model, pruned_masks, target_linear_names

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    epochs=1,
    batch_size=4,
    k=0.5,
    eval_retain_rows=4,
    eval_batch_size=8,
    max_new_tokens=2,
)


@pytest.fixture(scope="module")
def data():
    split = generate(seed=0, n_people=5, n_general=4).splits()  # 1 forget person: 8 rows
    return {k: v[:8] for k, v in split.items()}


def _inputs(make_tiny_lm, data, *, pruned: bool):
    model, tok = make_tiny_lm(seed=4)
    if pruned:
        prune_model(model, "magnitude", 0.5, progress=False)
    retain_model, _ = make_tiny_lm(seed=5)
    return Inputs(
        model, tok, data["forget"], data["retain"], data["holdout"], data["general"],
        retain_model, source="tiny",
    )  # fmt: skip


def _row(results, variant):
    (row,) = [r for r in results.rows if r["variant"] == variant]
    return row


def test_prune_none_several_variants_with_unlearn_then_prune(make_tiny_lm, data):
    inputs = _inputs(make_tiny_lm, data, pruned=True)
    start = copy.deepcopy(inputs.model)
    names = target_linear_names(start)
    masks = pruned_masks(start, names)
    cfg = PipelineConfig(
        prune="none", variants=("masked", "sau-update", "unlearn-then-prune"), **TINY
    )
    res = run_pipeline(inputs, cfg, progress=False, log=lambda msg: None)

    # Rows in the asked order; dense ran (unlearn-then-prune starts from it) but is not a row.
    assert [r["variant"] for r in res.rows] == list(cfg.variants)
    assert set(res.models) == {"dense", "masked", "sau-update", "unlearn-then-prune"}
    # No "target" reference: with prune="none" the given model is the pruned target.
    assert [r["variant"] for r in res.reference] == ["retain model", "target pruned"]
    assert res.config["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    for variant in ("masked", "sau-update", "unlearn-then-prune"):
        assert _row(res, variant)["sparsity_kept"] == 1.0
    assert res.plan_stats and res.plan_totals  # from the sau variant

    # unlearn-then-prune = the dense-unlearned model with the given model's zeros reapplied.
    dense, utp = res.models["dense"], res.models["unlearn-then-prune"]
    for n in names:
        want = dense.get_parameter(n).detach().masked_fill(masks[n], 0)
        assert torch.equal(utp.get_parameter(n), want), n
    assert not all(torch.equal(dense.get_parameter(n), start.get_parameter(n)) for n in names)
    before = evaluate_model(
        dense, inputs.tok, forget=inputs.forget, retain=inputs.retain[:1], progress=False,
        batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
    )  # fmt: skip
    assert _row(res, "unlearn-then-prune")["forget_rouge_before_prune"] == before["forget_rouge"]
    # The masked and SAU variants never touch a pruned entry.
    for variant in ("masked", "sau-update"):
        m = res.models[variant]
        assert all((m.get_parameter(n)[masks[n]] == 0).all() for n in names)


def test_magnitude_pruning_then_dense_and_sau_grad(make_tiny_lm, data):
    inputs = _inputs(make_tiny_lm, data, pruned=False)
    dense_start = copy.deepcopy(inputs.model)
    cfg = PipelineConfig(prune="magnitude", variants=("dense", "sau-grad"), **TINY)
    res = run_pipeline(inputs, cfg, progress=False, log=lambda msg: None, references=False)
    assert [r["variant"] for r in res.rows] == ["dense", "sau-grad"]
    assert res.reference == []
    names = target_linear_names(dense_start)
    pruned = inputs.model  # run_pipeline prunes the given model in place
    masks = pruned_masks(pruned, names)
    assert res.config["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    # dense unlearns the unpruned copy: its zeros are not the pruned set.
    assert _row(res, "dense")["sparsity_kept"] is None
    assert _row(res, "sau-grad")["sparsity_kept"] == 1.0
    sau = res.models["sau-grad"]
    assert all((sau.get_parameter(n)[masks[n]] == 0).all() for n in names)
    # dense unlearned the unpruned copy: the weights pruning removed are still there.
    dense = res.models["dense"]
    assert any((dense.get_parameter(n)[masks[n]] != 0).any() for n in names)


def test_config_file_accepts_nm(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"nm": [2, 4]}))
    cfg = load_config_file(str(path), PipelineConfig())
    assert cfg.nm == (2, 4)
    cfg.validate()


@pytest.mark.parametrize("nm", [(3, 2), (0, 4), (2,), (2.0, 4)])
def test_bad_nm_is_one_line(nm):
    with pytest.raises(SAUError, match="nm must be"):
        PipelineConfig(nm=nm).validate()


def test_pipeline_prunes_n_of_m(monkeypatch):
    """The pipeline hands the pattern to prune_model (whose own tests check the pattern)."""
    import sau.lab.pipeline as pipeline

    seen = {}
    monkeypatch.setattr("sau.lab.steps.prune_model", lambda *a, **k: seen.update(k))
    pipeline._prune_as_configured(object(), PipelineConfig(nm=(2, 4)), None, progress=False)
    assert seen["nm"] == (2, 4)


def test_sau_grad_and_sau_update_plan_once_with_the_same_result(make_tiny_lm, data, monkeypatch):
    """Both variants share one plan (rebound to each variant's copy) and train exactly as
    with a plan made for each: the rows equal a run of each variant alone."""
    import sau.lab.variants as variants

    calls = []
    real = variants.plan_selection
    monkeypatch.setattr(
        variants, "plan_selection", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    both = run_pipeline(
        _inputs(make_tiny_lm, data, pruned=False),
        PipelineConfig(variants=("sau-grad", "sau-update"), **TINY),
        progress=False, references=False, log=lambda m: None,
    )  # fmt: skip
    assert len(calls) == 1
    for variant in ("sau-grad", "sau-update"):
        alone = run_pipeline(
            _inputs(make_tiny_lm, data, pruned=False),
            PipelineConfig(variants=(variant,), **TINY),
            progress=False, references=False, log=lambda m: None,
        )  # fmt: skip
        metrics = {k: v for k, v in _row(alone, variant).items() if k != "seconds"}
        assert {k: v for k, v in _row(both, variant).items() if k != "seconds"} == metrics
        for name, p in alone.models[variant].named_parameters():
            assert torch.equal(p, both.models[variant].get_parameter(name)), name
    assert len(calls) == 3


def test_pipeline_config_checks_the_loop_settings_it_inherits():
    with pytest.raises(SAUError, match="--lr must be > 0"):
        PipelineConfig(lr=0.0).validate()
    with pytest.raises(SAUError, match="retain_batch_size"):
        PipelineConfig(retain_batch_size=0).validate()
    cfg = PipelineConfig(lr=2e-3, epochs=3, retain_batch_size=5, joint_forward=True)
    loop_cfg = cfg.unlearn_config()
    assert (loop_cfg.lr, loop_cfg.epochs, loop_cfg.retain_batch_size) == (2e-3, 3, 5)
    assert loop_cfg.joint_forward and type(loop_cfg).__name__ == "UnlearnConfig"


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"dtype": "float16"}, "--dtype must be among float32, bfloat16, got 'float16'"),
        ({"rounding": "floor"}, "--rounding must be among kahan, stochastic, nearest"),
        ({"state_bits": 16}, "--state-bits must be among 32, 8, got 16"),
        ({"state_bits": "8"}, "--state-bits must be an integer"),
        ({"state_bits": True}, "--state-bits must be an integer"),
    ],
)
def test_precision_settings_are_checked_naming_the_option(change, flag):
    with pytest.raises(SAUError) as err:
        PipelineConfig(**change).validate()
    assert str(err.value).startswith(flag)


def test_config_file_sets_the_precision(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"dtype": "bfloat16", "rounding": "nearest", "state_bits": 8}))
    cfg = load_config_file(str(path), PipelineConfig())
    cfg.validate()
    assert (cfg.dtype, cfg.rounding, cfg.state_bits) == ("bfloat16", "nearest", 8)
    defaults = PipelineConfig()
    assert (defaults.dtype, defaults.rounding, defaults.state_bits) == ("float32", "kahan", 32)


def test_float32_rows_record_the_precision_each_variant_used(make_tiny_lm, data):
    cfg = PipelineConfig(variants=("dense", "sau-update"), **TINY)
    res = run_pipeline(
        _inputs(make_tiny_lm, data, pruned=False), cfg,
        progress=False, references=False, log=lambda m: None,
    )  # fmt: skip
    assert res.config["dtype"] == "float32" and res.config["state_bits"] == 32
    # torch AdamW uses neither setting; float32 weights are not rounded by SAUAdamW's rule
    assert {k: _row(res, "dense")[k] for k in ("dtype", "rounding", "state_bits")} == {
        "dtype": "float32", "rounding": None, "state_bits": None,
    }  # fmt: skip
    assert _row(res, "sau-update")["rounding"] is None
    assert _row(res, "sau-update")["state_bits"] == 32


def test_bfloat16_run_casts_the_models_and_records_its_settings(make_tiny_lm, data):
    inputs = _inputs(make_tiny_lm, data, pruned=False)
    given = inputs.model
    cfg = PipelineConfig(
        variants=("dense", "sau-update"), dtype="bfloat16", rounding="stochastic", **TINY
    )
    res = run_pipeline(inputs, cfg, progress=False, log=lambda m: None)
    assert given.dtype == torch.float32  # the caller's float32 model is left as it was
    for variant in ("dense", "sau-update"):
        assert {p.dtype for p in res.models[variant].parameters()} == {torch.bfloat16}
    sau = _row(res, "sau-update")
    assert (sau["dtype"], sau["rounding"], sau["state_bits"]) == ("bfloat16", "stochastic", 32)
    assert _row(res, "dense")["rounding"] is None and _row(res, "dense")["dtype"] == "bfloat16"
    assert sau["sparsity_kept"] == 1.0  # pruned entries stay exactly zero in bfloat16 too
    assert {r["dtype"] for r in res.reference} == {"bfloat16"}
    for row in res.rows + res.reference:  # evaluation works on bfloat16 models
        assert 0.0 <= row["forget_rouge"] <= 1.0 and row["forget_prob"] > 0.0
    assert res.config["dtype"] == "bfloat16" and res.config["rounding"] == "stochastic"


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "4GiB"])
def test_saliency_memory_is_checked_naming_the_option(bad):
    with pytest.raises(SAUError, match="--saliency-memory must be"):
        PipelineConfig(saliency_memory=bad).validate()
    PipelineConfig(saliency_memory=1).validate()
    assert PipelineConfig().saliency_memory is None


def test_saliency_memory_gives_the_same_model_and_logs_its_passes(make_tiny_lm, data):
    models, logs = {}, {}
    for memory in (None, 8192):  # 8192 bytes: the largest decoder weight, 32 x 64 float32
        inputs = _inputs(make_tiny_lm, data, pruned=True)
        cfg = PipelineConfig(prune="none", variants=("sau",), saliency_memory=memory, **TINY)
        logs[memory] = []
        res = run_pipeline(inputs, cfg, progress=False, references=False, log=logs[memory].append)
        models[memory] = res.models["sau"].state_dict()
    plain, grouped = models[None], models[8192]
    assert plain.keys() == grouped.keys()
    assert all(torch.equal(plain[k], grouped[k]) for k in plain)
    assert not any("saliency:" in line for line in logs[None])
    # 2 layers: per layer q+k+v+o (16 KiB) in two passes, gate, up, down one each.
    said = [line for line in logs[8192] if line.startswith("saliency:")]
    assert said == ["saliency: 10 pass(es) over the forget rows, at most 8192 bytes of "
                    "accumulators at a time"]  # fmt: skip
