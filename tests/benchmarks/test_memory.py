"""benchmarks/memory.py's code path at a tiny size, in process: every configuration of the
CPU and the GPU mode runs and reports what it allocated, so the one GPU run cannot fail
for a silly reason (the CUDA meter itself needs a GPU)."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import memory, memory_child

pytestmark = pytest.mark.usefixtures("one_thread")


def specs(gpu: bool) -> list[dict]:
    every = memory.STEP_CONFIGS + memory.CKPT_CONFIGS + memory.E2E_CONFIGS
    args = argparse.Namespace(gpu=gpu, tiny=True, configs=every, threads=None, device="cpu")
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


def test_cached_model_is_bitwise_the_one_built_in_place(tmp_path):
    # The CPU run builds the model once (the prepare child); every row reads it back.
    # What a row measures must not depend on that: the same tensors, bitwise.
    spec = dict(dims=memory.TINY_DIMS, depths=[2], dtype="float32", cache=str(tmp_path))
    memory_child.prepare(spec)
    built, names = memory_child.build_model(memory.TINY_DIMS, 2, torch.float32, "cpu")
    loaded, names2, sparsity = memory_child.load_model(memory.TINY_DIMS, 2, torch.float32, tmp_path)
    assert names2 == names and sparsity == memory_child._sparsity(built, names)
    pairs = zip(
        [*built.named_parameters(), *built.named_buffers()],
        [*loaded.named_parameters(), *loaded.named_buffers()],
        strict=True,
    )
    for (name, a), (name2, b) in pairs:
        assert name == name2 and a.dtype == b.dtype and torch.equal(a, b), name
        assert a.requires_grad == b.requires_grad, name
    other = dict(memory.TINY_DIMS, intermediate=memory.TINY_DIMS["intermediate"] + 8)
    with pytest.raises(ValueError, match="another model"):
        memory_child.load_model(other, 2, torch.float32, tmp_path)


def test_step_rows_step_the_plan_that_plan_selection_made(tmp_path):
    # prepare runs plan_selection once per depth and caches the plan; a SAU row reads it
    # back: bitwise the plan made in place, bound to the row's own parameters.
    spec = dict(dims=memory.TINY_DIMS, depths=[2], dtype="float32", cache=str(tmp_path))
    spec.update(device="cpu", tokens=16)
    memory_child.prepare(dict(spec, plan=True))
    built, names = memory_child.build_model(memory.TINY_DIMS, 2, torch.float32, "cpu")
    made = memory_child.make_plan(built, names)
    loaded, _, _ = memory_child.load_model(memory.TINY_DIMS, 2, torch.float32, tmp_path)
    read = memory_child.step_plan(loaded, names, dict(spec, plan_cache=str(tmp_path)))
    assert list(read) == list(made) == names
    for name in names:
        a, b = made[name], read[name]
        assert b.param is loaded.get_parameter(name)
        assert torch.equal(a.selection.index, b.selection.index)
        assert a.selection.index.dtype == b.selection.index.dtype == torch.int32
        assert torch.equal(a.entry_scale, b.entry_scale)
        assert a.amplification == b.amplification
        for field in ("n_survivors", "n_selected", "threshold", "importance_selected"):
            assert float(getattr(a.selection, field)) == float(getattr(b.selection, field))
    row = memory_child.measure(dict(spec, config="sau"), 2)
    assert row["n_selected"] == sum(lp.selection.n_selected for lp in made.values())


def test_scheduler_keeps_running_peaks_within_budget_and_waits_for_inputs(tmp_path):
    import threading
    import time

    from benchmarks import memory_sched

    ready = tmp_path / "model.json"
    lock, live, seen = threading.Lock(), {}, []

    def run(spec):
        with lock:
            live[spec["config"]] = spec["est"]
            seen.append((spec["config"], dict(live), ready.exists()))
        if spec["config"] == "prepare":
            ready.write_text("{}")
        time.sleep(0.05)
        with lock:
            del live[spec["config"]]
        return {"config": spec["config"]}

    est = {"prepare": 2, "big1": 6, "big2": 6, "small1": 3, "small2": 3}
    jobs = [
        memory_sched.Job({"config": c, "est": e}, () if c == "prepare" else (ready,), e)
        for c, e in est.items()
    ]
    results, timeline = memory_sched.run_jobs(jobs, run, slots=2, budget=9, poll=0.01)
    assert [spec["config"] for spec, _ in results] == list(est)
    assert all("error" not in res for _, res in results)
    assert {row["config"] for row in timeline} == set(est)
    for config, running, had_input in seen:
        assert sum(running.values()) <= 9, (config, running)
        assert config == "prepare" or had_input
    assert max(len(running) for _, running, _ in seen) == 2  # it did run two at once

    # A producer that never writes its file: the jobs that need it fail, nothing hangs.
    missing = memory_sched.Job({"config": "row", "est": 1}, (tmp_path / "never",), 1)
    ((_, res),) = memory_sched.run_jobs([missing], run, slots=2, budget=9, poll=0.01)[0]
    assert "never" in res["error"]


def shape_args(**kw) -> argparse.Namespace:
    base = dict(shape="llama-3.1-8b", tiny=True, tokens=None, dtype="bfloat16", layers=[4, 2])
    return argparse.Namespace(**dict(base, configs=None, threads=None) | kw)


@pytest.mark.slow  # ~20-40 s on 2 cores: sixteen rows at two depths
def test_shape_mode_runs_every_row_and_models_its_bytes(tmp_path):
    # `--shape llama-3.1-8b --tiny`: the rows of the 8B table at the tiny widths, in
    # process, from the per-depth cache a prepare child writes.
    specs = memory.shape_specs(shape_args())
    assert [s["config"] for s in specs] == list(memory.SHAPE_CONFIGS)
    assert all(s["depths"] == [2, 4] and s["dtype"] == "bfloat16" for s in specs)
    memory_child.prepare(dict(specs[0], cache=str(tmp_path)))
    assert memory_child.model_cache(tmp_path, 2) == tmp_path / "layers-2"
    rows = []
    for spec in specs:
        spec = dict(spec, cache=str(tmp_path))
        depths = [memory_child.measure(spec, layers) for layers in spec["depths"]]
        row = memory.summarize({"config": spec["config"], "depths": depths}, spec)
        assert "error" not in row and row["full_layers"] == 4, spec["config"]
        row["bytes_model"] = memory.model_row(row, spec, depths)
        rows.append(row)
        raw = {d["layers"]: d for d in depths}
        if spec["config"].startswith("sau"):  # k = 0.3 of 50% survivors
            assert abs(raw[4]["n_selected"] / raw[4]["n_trainable"] - 0.15) < 0.01
        if spec["config"] == "saliency-bf16-bounded":
            assert raw[2]["passes"] == 2 and raw[4]["passes"] == 4  # one layer a pass
        if spec["config"] == "plan":
            assert raw[4]["plan_bytes"] == 5 * raw[4]["n_selected"]  # int32 index + code
    byname = {r["config"]: r for r in rows}
    state = {c: r["bytes_model"]["4"]["terms"].get("state") for c, r in byname.items()}
    assert state["sau-in-backward-8bit-sr-ckpt"] < state["sau-in-backward-8bit-ckpt"]
    assert state["sau-in-backward-8bit-ckpt"] < state["sau"] < state["adamw-fp32"]
    assert state["adamw-fp32"] < state["masked-fp32"]
    assert memory.fit_summary(rows)["leanest"].startswith("sau")
    assert memory.shape_table(rows).count("\n") == len(rows) + 1


def test_bounded_saliency_row_keeps_finished_groups_on_disk_and_their_values(tmp_path):
    # The bounded row sends each finished group to a file (a GPU sends it to host
    # memory): what comes back is bitwise the library's one-pass saliency.
    spec = memory.shape_specs(shape_args(configs=["saliency-bf16", "saliency-bf16-bounded"]))
    memory_child.prepare(dict(spec[0], cache=str(tmp_path)))
    got = {}
    for s in spec:
        got[s["config"]] = {}
        s = dict(s, cache=str(tmp_path), keep_saliency=got[s["config"]])
        row = memory_child.measure(s, 2)
        assert row["passes"] == (2 if s["config"].endswith("bounded") else 1)
    one, bounded = got["saliency-bf16"], got["saliency-bf16-bounded"]
    assert list(one) == list(bounded) and len(one) == 14
    for name in one:
        assert one[name].dtype == bounded[name].dtype == torch.bfloat16
        assert torch.equal(one[name], bounded[name]), name


def test_bytes_model_terms_at_llama_8b_widths():
    dims = memory.GPU_DIMS
    assert memory.layer_params(dims) == 218_103_808
    assert memory.act_per_token(dims, ckpt=False) == 184_320  # 8i + 16h + 4kv
    assert memory.act_per_token(dims, ckpt=True) == 2 * 4096
    # index 4 + moments 8 + kahan 1; 8-bit: index 4 + codes 2 + scales 8/256 + kahan 1
    assert memory.state_per_entry("sau") == 13
    assert memory.state_per_entry("sau-in-backward-8bit-ckpt") == 4 + 2 + 8 / 256 + 1
    terms = memory.bytes_model("sau-in-backward-ckpt", dims, 32, 512, 10**9, 0)
    assert terms["weights"] == 2 * (2 * 128256 * 4096 + 32 * (218_103_808 + 2 * 4096) + 4096)
    assert terms["state"] == 13 * 10**9


def test_shape_run_plans_one_child_per_row_and_depth_and_joins_them(tmp_path):
    # --shape: a prepare child per depth (no inputs), then a child per row and depth that
    # waits for its own depth's model; merge_depths gives each row its two depths back.
    specs = memory.shape_specs(shape_args(configs=["sau", "plan", "masked-fp32"]))
    jobs = memory.cpu_jobs(specs, tmp_path, threads=1)
    preps = [j for j in jobs if j.spec["config"] == "prepare"]
    assert sorted(j.spec["depths"][0] for j in preps) == [2, 4]
    assert all(j.spec["layered"] and not j.needs for j in preps)
    rows = [j for j in jobs if j.spec["config"] != "prepare"]
    assert len(rows) == 6 and all(len(j.spec["depths"]) == 1 for j in rows)
    for j in rows:
        assert j.needs == (tmp_path / f"layers-{j.spec['depths'][0]}" / "model.json",)
    assert [j.spec["config"] for j in rows[:3]] == ["masked-fp32", "sau", "plan"]  # longest first
    assert rows[0].spec["depths"] == [4]
    fake = [(j.spec, {"config": j.spec["config"], "wall_s": 1.0,
                      "depths": [{"layers": j.spec["depths"][0]}]}) for j in rows]  # fmt: skip
    merged = memory.merge_depths(fake[::-1])
    assert sorted(s["config"] for s, _ in merged) == ["masked-fp32", "plan", "sau"]
    for spec, res in merged:
        assert spec["depths"] == [2, 4] and [d["layers"] for d in res["depths"]] == [2, 4]
        assert res["wall_s"] == 2.0
    failed = memory.merge_depths([(rows[0].spec, {"config": "masked-fp32", "error": "boom"})])
    assert failed[0][1]["depths"] == [{"layers": 4, "error": "boom"}]
