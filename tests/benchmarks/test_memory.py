"""benchmarks/memory.py's code path at a tiny size, in process: every configuration of the
CPU and the GPU mode runs and reports what it allocated, so the one GPU run cannot fail
for a silly reason (the CUDA meter itself needs a GPU)."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import memory, memory_child


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def specs(gpu: bool) -> list[dict]:
    args = argparse.Namespace(gpu=gpu, tiny=True, configs=None, threads=None, device="cpu")
    return memory.plan_runs(args)


@pytest.mark.slow  # ~10-40 s on 2 cores: a dozen model builds and steps
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-mode", "gpu-mode"])
def test_every_configuration_runs_and_counts_its_buffers(gpu):
    rows = {}
    for spec in specs(gpu):
        result = {"config": spec["config"], "depths": [], "wall_s": 0.0}
        for layers in spec["depths"]:
            result["depths"].append(memory_child.measure(spec, layers))
        rows[spec["config"]] = memory.summarize(result, spec), result["depths"][-1]
    expected = set(memory.STEP_CONFIGS) | set(memory.CKPT_CONFIGS)
    expected |= set(memory.E2E_CONFIGS) if gpu else set()
    assert set(rows) == expected
    for name, (row, raw) in rows.items():
        assert "error" not in row, name
        assert raw["peak"] > 0 and raw["base"] > 0  # (tiny, in process: RSS noise only)
        assert abs(raw["sparsity"] - 0.5) < 0.02  # pruned 50% by sampled magnitude
        if gpu and not name.startswith("e2e"):
            assert row["full_peak_bytes"] > 0 and row["layers"] == 4
    grads = {name: raw["grads_bytes"] for name, (_, raw) in rows.items()}
    state = {name: raw["state_bytes"] for name, (_, raw) in rows.items()}
    sal = {name: raw["saliency_bytes"] for name, (_, raw) in rows.items()}
    # One layer's gradient at a time in the in-backward and saliency rows, all in the others.
    assert grads["sau-in-backward"] < grads["sau"] == grads["adamw"] == grads["adamw-ckpt"]
    assert grads["sau-in-backward-ckpt"] == grads["sau-in-backward"]
    # k = 0.3 of 50% survivors: 12 B per selected entry, ~1.8 B per trainable param.
    n = rows["sau"][1]["n_trainable"]
    assert state["sau"] <= 2 * n < state["adamw"]
    assert state["masked"] == state["adamw"] + rows["masked"][1]["n_trainable"]  # bool masks
    assert sal["saliency-bf16"] * 2 == sal["saliency-fp32"] > 0
    table = memory.table([row for row, _ in rows.values()], gpu)
    assert table.count("\n") == len(rows) + 1
