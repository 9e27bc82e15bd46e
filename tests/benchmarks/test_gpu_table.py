"""benchmarks/gpu_table.py: the README's GPU table is the one built from its recorded JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_is_the_one_built_from_the_json_it_names():
    readme = (ROOT / "README.md").read_text()
    source = ROOT / gpu_table.source_of(readme)
    assert source.is_file(), source
    assert gpu_table.block_of(readme) == gpu_table.table(json.loads(source.read_text()))


def _result(**sections) -> dict:
    env = {"device": "GPU X", "torch": "t", "triton": "tr", "commit": "abcdef123", "date": "d"}
    return {"environment": env, "tiny": False, "sections": sections}


def _select(n_rows, cols, sau, topk):
    return {
        "shape": [n_rows, cols], "sau_ms": sau, "torch_topk_values_only_ms": topk,
        "torch_sort_values_only_ms": 2 * topk, "torch_topk_full_ms": 3 * topk,
    }  # fmt: skip


def test_losing_rows_stay_and_are_bold_and_the_readme_keeps_the_largest_select():
    step = dict(n_params=10**6, sau_optimizer_ms=2.0, sau_per_segment_ms=5.0, torch_fused_ms=4.0)
    step.update(own_floor_ms=1.0, sau_state_bytes_per_param=1.8)
    result = _result(
        time_select=[_select(4, 4, 1.0, 2.0), _select(8, 8, 3.0, 1.0)],
        time_step_llama_float32=step,
        time_step_moe_bfloat16=step,
    )
    short, full = gpu_table.table(result), gpu_table.table(result, full=True)
    assert "**GPU X**" in short and "commit abcdef1, measured d" in short
    assert "`select_topk`, 8×8" in short and "`select_topk`, 4×4" not in short
    assert "| 3 ms | `torch.topk` on survivor values only 1 ms | **3.00x slower** |" in short
    assert "`select_topk`, 4×4" in full and "2.00x faster" in full
    llama = [ln for ln in short.splitlines() if "fused=True" in ln or "copy bandwidth" in ln]
    assert len(llama) == 2 and "**2.00x slower**" in llama[1]  # 2 ms vs its 1 ms floor
    assert short.count("one launch per layer and expert 5 ms | 2.50x faster") == 1  # MoE only
    assert full.count("one launch per layer and expert") == 2
    assert "| optimizer state, 50% sparse, k = 0.3 | 1.80 B/param |" in short


def test_replace_table_needs_both_markers_and_records_the_source():
    text = "a\n<!-- gpu-table old.json -->\nold rows\n<!-- /gpu-table -->\nb\n"
    out = gpu_table.replace_table(text, "new rows\n", "new.json")
    assert out == "a\n<!-- gpu-table new.json -->\nnew rows\n<!-- /gpu-table -->\nb\n"
    assert gpu_table.source_of(out) == "new.json" and gpu_table.block_of(out) == "new rows\n"
    with pytest.raises(ValueError, match="marker"):
        gpu_table.replace_table("no markers\n", "x", "y.json")
