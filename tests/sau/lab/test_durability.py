"""Durability of an update under 4-bit quantization: |dw| / bin, "survives", sau-durable."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sau.lab.data import generate
from sau.lab.durable import bin_width, durability_stats, make_durable_
from sau.lab.inputs import Inputs
from sau.lab.pipeline import PipelineConfig, run_pipeline
from sau.lab.quantize import (
    NF4_CODE,
    nf4_codes,
    nf4_quantize_dequantize,
    quantize_dequantize,
)
from sau.lab.sweep import Settings, Source, run_sweep
from sau.prune import prune_model, pruned_masks, target_linear_names


def _start():
    # One RTN group (128) = two NF4 blocks (64). Entry 0 is the max (1.0) of both the group
    # and block 0; block 1's max is 0.7229... (entry 64), so its absmax is 0.7229...
    w = torch.zeros(1, 128)
    w[0, 0] = 1.0
    w[0, 1:5] = torch.tensor(NF4_CODE[8])  # code 8 of block 0 (0.0796)
    w[0, 64] = torch.tensor(NF4_CODE[14])
    return w


def test_bin_width_rtn_is_the_group_scale_and_nf4_the_code_cell():
    w = _start()
    scale = torch.tensor(1.0 / 7).to(torch.bfloat16).float()
    assert torch.equal(bin_width(w, "rtn4"), scale.expand(1, 128))
    c = NF4_CODE
    nf4 = bin_width(w, "nf4")
    assert nf4[0, 1] == torch.tensor((c[9] - c[7]) / 2)  # interior code: half the span
    assert nf4[0, 0] == torch.tensor(c[15] - c[14])  # end code: the one gap
    # Entry 64 is block 1's max: code 15 of absmax c[14].
    assert nf4[0, 64] == torch.tensor(c[15] - c[14]) * torch.tensor(c[14])
    with pytest.raises(ValueError):
        bin_width(w, "int3")


def test_durability_stats_on_a_hand_made_update():
    before = _start()
    after = before.clone()
    d = (NF4_CODE[9] - NF4_CODE[7]) / 2  # the NF4 bin at code 8, absmax 1
    # Four moved entries at code 8 of block 0: |dw| = 0.1, 0.2, 0.3, 2.0 NF4 bins, upward.
    for i, f in zip(range(1, 5), (0.1, 0.2, 0.3, 2.0)):
        after[0, i] = before[0, i] + f * d
    s = durability_stats({"w": before}, {"w": after})
    assert s["moved"] == 4
    # NF4: only 2 bins crosses the midpoint to code 9 (0.1..0.3 bins stay below it).
    assert s["survive_nf4"] == 0.25
    assert s["dw_bin_nf4_p50"] == pytest.approx(0.25, rel=1e-5)  # median of .1 .2 .3 2
    # RTN: bin 1/7 (bf16); code 8 * 1 = 0.0796 rounds to q = 1 (0.1428); 2 NF4 bins
    # (+0.161) crosses to q = 2 (> 1.5 / 7), the others stay below 1.5 / 7.
    assert s["survive_rtn4"] == 0.25
    scale = float(torch.tensor(1.0 / 7).to(torch.bfloat16))
    assert s["dw_bin_rtn4_p10"] == pytest.approx(
        float(torch.quantile(torch.tensor([0.1, 0.2, 0.3, 2.0]) * d / scale, 0.1)), rel=1e-5
    )


def test_durability_stats_nothing_moved():
    w = _start()
    s = durability_stats({"w": w}, {"w": w.clone()})
    assert s["moved"] == 0 and s["survive_nf4"] is None and s["dw_bin_rtn4_p50"] is None


def test_make_durable_pushes_selected_entries_across_a_bin_and_keeps_zeros():
    gen = torch.Generator().manual_seed(0)
    before = torch.randn(8, 128, generator=gen) * 0.05
    before[torch.rand(8, 128, generator=gen) < 0.5] = 0.0  # pruned
    after = before.clone()
    live = before != 0
    after[live] += 1e-5 * torch.randn(8, 128, generator=gen)[live]  # far below a bin
    p = torch.nn.Parameter(after.clone())
    selected = live.view(-1).nonzero().view(-1)[::2]  # half the survivors
    pushed = make_durable_({"w": p}, {"w": before}, {"w": selected})
    new = p.detach()
    assert torch.equal(new[~live], torch.zeros_like(new[~live]))  # pruned stay zero
    sel = torch.zeros(8 * 128, dtype=torch.bool)
    sel[selected] = True
    sel = sel.view(8, 128)
    assert torch.equal(new[~sel], after[~sel])  # unselected untouched
    changed = nf4_quantize_dequantize(new) != nf4_quantize_dequantize(before)
    moved_sel = sel & (after != before)
    assert pushed > 0 and changed[moved_sel].float().mean() > 0.95
    # Each pushed entry moved in the direction of its update.
    assert ((new - before).sign() == (after - before).sign())[moved_sel].all()
    # No push past the old quantization: RTN sees a change at most as large as NF4's.
    assert torch.isfinite(quantize_dequantize(new, 4)).all()


def test_make_durable_without_selection_pushes_every_moved_entry():
    before = _start()
    after = before.clone()
    after[0, 1] += 1e-4  # moved, code 8 -> still code 8
    p = torch.nn.Parameter(after.clone())
    assert make_durable_({"w": p}, {"w": before}) == 1
    assert p.detach()[0, 1] == torch.tensor(NF4_CODE[9])  # next level times absmax 1
    assert torch.equal(p.detach()[0, 5:64], torch.zeros(59))


def test_survives_counts_levels_not_a_rescaled_block():
    # The block max grows: every dequantized NF4 value of the block changes, no level does.
    before = _start()
    after = before.clone()
    after[0, 0] = 1.1
    after[0, 1] += 1e-3
    s = durability_stats({"w": before}, {"w": after})
    assert s["moved"] == 2
    assert s["survive_nf4"] == 0.0 and s["qdiff_nf4"] == 1.0


def test_make_durable_leaves_a_block_max_alone():
    before = _start()
    after = before.clone()
    after[0, 0] = 0.99  # the block's max, moved inward, still code 15
    p = torch.nn.Parameter(after.clone())
    assert make_durable_({"w": p}, {"w": before}) == 0
    assert torch.equal(p.detach(), after)


def test_sau_durable_runs_as_a_sweep_cell_with_nf4_and_durability_columns(
    tmp_path, write_sweep_files, one_thread
):
    root = write_sweep_files(tmp_path / "src")
    files = {s: str(root / f"{s}.jsonl") for s in ("forget", "retain", "holdout", "general")}
    source = Source(corpus=None, model=str(root / "model"), **files)
    settings = Settings(
        epochs=1,
        batch_size=4,
        eval_retain_rows=8,
        eval_batch_size=8,
        max_new_tokens=4,
        bits=(4, "nf4"),
    )
    grid = [dict(sparsity=(0.5,), variant=("sau-update", "sau-durable"), lr=(1e-3,))]
    out = tmp_path / "sweep"
    run_sweep(grid, out, source=source, settings=settings, progress=False, log=lambda m: None)
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    upd, dur = rows["sau-update"], rows["sau-durable"]
    for r in (upd, dur):
        assert r["sparsity_kept"] == 1.0  # pruned weights stayed zero
        assert "qnf4_forget_rouge" in r and r["moved"] > 0
        assert 0.0 <= r["survive_nf4"] <= 1.0 and r["dw_bin_nf4_p10"] <= r["dw_bin_nf4_p90"]
    assert dur["durable_pushed"] > 0 and dur["survive_nf4"] > upd["survive_nf4"]


def test_pipeline_runs_sau_durable_as_sau_update_plus_the_push(make_tiny_lm, one_thread):
    split = generate(seed=0, n_people=5, n_general=4).splits()
    data = {k: v[:8] for k, v in split.items()}
    model, tok = make_tiny_lm(seed=4)
    prune_model(model, "magnitude", 0.5, progress=False)
    start = copy.deepcopy(model)
    retain_model, _ = make_tiny_lm(seed=5)
    inputs = Inputs(
        model, tok, data["forget"], data["retain"], data["holdout"], data["general"],
        retain_model, source="tiny",
    )  # fmt: skip
    cfg = PipelineConfig(
        prune="none", variants=("sau-update", "sau-durable"), epochs=1, batch_size=4, k=0.5,
        eval_retain_rows=4, eval_batch_size=8, max_new_tokens=2, lr=1e-4,
    )  # fmt: skip
    res = run_pipeline(inputs, cfg, progress=False, log=lambda msg: None)
    names = target_linear_names(start)
    masks = pruned_masks(start, names)
    upd, dur = res.models["sau-update"], res.models["sau-durable"]
    for n in names:
        b, u, d = (m.get_parameter(n).detach() for m in (start, upd, dur))
        assert (d[masks[n]] == 0).all()  # pruned entries stay zero
        # Only entries sau-update moved are pushed, each in its update's direction.
        same = u == b
        assert torch.equal(d[same], b[same])
        assert ((d - b).sign() == (u - b).sign()).all()
        # Each pushed entry now sits on a different NF4 level than it started on.
        pushed = (d != u).view(-1)
        lv_d, lv_b = nf4_codes(d)[0].view(-1), nf4_codes(b)[0].view(-1)
        assert (lv_d[: d.numel()] != lv_b[: b.numel()])[pushed].all()
    assert any(not torch.equal(upd.get_parameter(n), dur.get_parameter(n)) for n in names)


def test_stop_at_retain_judges_the_pushed_model_and_keeps_the_epoch_before(make_tiny_lm):
    from types import SimpleNamespace

    from sau.lab.sweep.stop import StopAtRetain

    model, _ = make_tiny_lm(seed=0)
    name = target_linear_names(model)[0]
    w = model.get_parameter(name)
    start = w.detach().clone()
    inputs = SimpleNamespace(forget=[{}] * 4)
    scores, seen = iter([0.5, 0.4, 0.2]), []

    def push():
        with torch.no_grad():
            w.add_(100.0)
        return 7

    stop = StopAtRetain(0.3, model, inputs, SimpleNamespace(batch_size=2), [name], push)

    def score():  # the check scores the model as reported: pushed
        seen.append(float((w.detach() - start).mean()))
        return next(scores)

    stop._forget_rouge = score
    for step in range(1, 7):
        with torch.no_grad():
            w.add_(1.0)  # an optimizer step
        done = stop(step)
        assert done == (step == 6)
        if step == 2:  # not reached: the optimizer's weights are back, the pushed kept
            assert torch.allclose(w.detach(), start + 2.0)
            assert torch.allclose(stop.prev[name], start + 102.0) and stop.prev_epoch == 1
    assert seen == pytest.approx([102.0, 104.0, 106.0])
    assert torch.allclose(stop.prev[name], start + 104.0)  # epoch 2, pushed
    assert torch.allclose(w.detach(), start + 106.0)  # reached: the pushed model stays
    summary = stop.summary(6, 20)
    assert summary["reached_retain"] and summary["prev_epoch"] == 2 and stop.pushed == 7
    assert summary["forget_rouge_per_epoch"] == [0.5, 0.4, 0.2]


def test_a_stopped_cell_also_evaluates_the_epoch_before_the_crossing(
    tmp_path, write_sweep_files, one_thread, monkeypatch
):
    from sau.lab.sweep.stop import StopAtRetain

    # The tiny models answer nothing (ROUGE-L 0 = the retain level): script the check so
    # epoch 1 is above the level and epoch 2 below it.
    monkeypatch.setattr(StopAtRetain, "_forget_rouge", lambda self: (1.0, -1.0)[len(self.trace)])
    root = write_sweep_files(tmp_path / "src")
    files = {s: str(root / f"{s}.jsonl") for s in ("forget", "retain", "holdout", "general")}
    source = Source(
        corpus=None, model=str(root / "model"), retain_model=str(root / "retain_model"), **files
    )
    settings = Settings(
        max_epochs=3, batch_size=4, eval_retain_rows=8, eval_batch_size=8, max_new_tokens=4,
        bits=("nf4",),
    )  # fmt: skip
    grid = [
        dict(sparsity=(0.5,), variant=("masked", "sau-durable"), lr=(1e-3,), stop_at=("retain",))
    ]
    out = tmp_path / "sweep"
    run_sweep(grid, out, source=source, settings=settings, progress=False, log=lambda m: None)
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    for variant in ("masked", "sau-durable"):
        r = rows[variant]
        assert r["reached_retain"] and r["epochs_run"] == 2 and r["prev_epoch"] == 1
        assert r["forget_rouge_per_epoch"] == [1.0, -1.0]
        assert 0 < r["prev_moved"] and "prev_qnf4_forget_rouge" in r
        assert r["prev_model_utility"] is not None and r["prev_sparsity_kept"] == 1.0
    # The epoch before is the model as reported then: sau-durable's pushed model, whose
    # moved entries nearly all changed NF4 level.
    dur, masked = rows["sau-durable"], rows["masked"]
    assert dur["prev_survive_nf4"] > 0.9 > masked["prev_survive_nf4"]
    assert dur["durable_pushed"] > 0 and "durable_pushed" not in masked
