"""The selection-option variants run as sweep cells (registry and plans)."""

from __future__ import annotations

import argparse
import json

import pytest

from sau.cli.sweep import _bits
from sau.errors import SAUError
from sau.lab.sweep import Settings, Source, expand, run_sweep
from sau.lab.variants import VARIANTS

OPTIONS = ("sau-contrast", "sau-saliency-amp", "sau-global", "sau-mass")
TINY = Settings(
    epochs=1,
    max_epochs=2,
    batch_size=4,
    eval_retain_rows=8,
    eval_batch_size=8,
    max_new_tokens=4,
    bits=(4,),
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_option_variants_are_registered_and_expand():
    assert VARIANTS["sau-saliency-amp"].amplify == "saliency"
    assert VARIANTS["sau-contrast"].plan["score"] == "contrast"
    cells = expand([dict(variant=OPTIONS)])
    mass = next(c for c in cells if c.variant == "sau-mass")
    assert mass.k == 0.8 and ":" not in mass.key()


def test_option_variants_run_as_sweep_cells(tmp_path, write_sweep_files):
    root = write_sweep_files(tmp_path / "src")
    source = Source(
        corpus=None,
        model=str(root / "model"),
        forget=str(root / "forget.jsonl"),
        retain=str(root / "retain.jsonl"),
        holdout=str(root / "holdout.jsonl"),
        general=str(root / "general.jsonl"),
        retain_model=str(root / "retain_model"),
    )
    grid = [dict(sparsity=(0.5,), variant=("sau-update",) + OPTIONS, lr=(1e-3,))]
    out = tmp_path / "sweep"
    run_sweep(grid, out, source=source, settings=TINY, progress=False, log=lambda m: None)
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(OPTIONS) <= set(rows)
    for v in OPTIONS:
        assert rows[v]["sparsity_kept"] == 1.0  # pruned weights stayed zero
    # same plan as sau-update plus one uint8 code per selected entry: the byte
    # difference is |G|, and sau-update holds 12 bytes per entry of G plus 12 per layer
    update = rows["sau-update"]["optimizer_state_bytes"]
    n_selected = rows["sau-saliency-amp"]["optimizer_state_bytes"] - update
    assert n_selected > 0 and (update - 12 * n_selected) % 12 == 0
    assert 0 < update - 12 * n_selected <= 12 * 64


def test_cached_plan_rebound_to_a_cell_model_keeps_per_expert_plans(tmp_path):
    """CellRunner._plan hands each cell the cached plan on the cell's own model copy,
    every LayerPlan field kept: a fused experts tensor steps each expert with its own w."""
    import copy

    import torch

    from sau import compute_saliency
    from sau.lab.sweep import run as run_mod
    from sau.lab.sweep.grid import Cell
    from sau.lab.sweep.run import CellRunner
    from sau.prune import prune_model
    from sau.unlearn.objectives import nll
    from tests.sau.families import make_model, tokenizer_stand_in

    torch.manual_seed(0)
    tok = tokenizer_stand_in()
    start = make_model("mixtral", tok)
    prune_model(start, "magnitude", 0.5, progress=False)  # pruned importance: w > 1
    batch = tok(["Alice Smith was born in Paris in 1901."], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    saliency = compute_saliency(start, [batch], nll, progress=False)
    runner = CellRunner(None, Settings(), tmp_path, lambda cell: None)
    plans: dict = {}
    pruned = run_mod._Pruned(None, start, None, saliency, plans, {})
    runner._pruned_start = lambda cell: pruned
    cell = Cell(seed=0, variant="sau-update", prune="magnitude", sparsity=0.5,
                method="graddiff", lr=1e-3, k=0.3, alpha=0.1)  # fmt: skip
    model = copy.deepcopy(start)
    plan = runner._plan(cell, model)
    (cached,) = plans.values()
    fused = [n for n, lp in cached.items() if lp.experts]
    assert fused, "the mixtral stand-in has fused experts tensors"
    for name, lp in plan.items():
        assert lp.param is model.get_parameter(name)
        assert lp.segments() == cached[name].segments()
        assert len(lp.experts) == len(cached[name].experts)
    assert any(len({w for *_, w in plan[n].segments()}) > 1 for n in fused)


def test_bits_take_nf4_beside_rtn_widths():
    assert [_bits(t) for t in ("4", "NF4", "8")] == [4, "nf4", 8]
    with pytest.raises(argparse.ArgumentTypeError):
        _bits("nf3")
    Settings(bits=(4, "nf4")).check()
    with pytest.raises(SAUError, match="nf4"):
        Settings(bits=("fp4",)).check()
