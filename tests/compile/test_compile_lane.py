"""The compile lane end to end on planted kernels: the recorder sees a kernel in a module
no list names, and the compile step fails on a compile error the interpreter accepts, on
register spills, and on registers above a budget.

One interpreter run (``TRITON_INTERPRET=1``, the recorder as a pytest plugin) launches the
planted kernels from a module loaded as ``sau_kernels._compile_lane_probe``; one compile
run (sm_90 only, to stay cheap) compiles what it recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.compile import lane  # noqa: E402  (needs triton)

ROOT = Path(__file__).resolve().parents[2]
PROBE = "sau_kernels._compile_lane_probe"

PROBE_SOURCE = """
import torch
import triton
import triton.language as tl


@triton.jit
def _clean_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=live, other=0.0) * 2.0, mask=live)


def _double(x):  # no @triton.jit: plain Python to the interpreter, unknown to the compiler
    return x * 2.0


@triton.jit
def _broken_kernel(x_ptr):
    offs = tl.arange(0, 16)
    tl.store(x_ptr + offs, _double(tl.load(x_ptr + offs)))


@triton.jit
def _spilling_kernel(x_ptr, BLOCK: tl.constexpr):
    # One warp holds BLOCK floats across the reduction: 512 a thread, past 255 registers.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, x / tl.sum(x, axis=0))


def launch_all():
    x = torch.ones(16384)
    _clean_kernel[(1,)](x, 100, BLOCK=128)  # n: i32
    _clean_kernel[(1,)](x, 2**33, BLOCK=128)  # n: i64, divisible by 16
    _clean_kernel[(1,)](x, 1, BLOCK=128)  # n: the constant 1
    _clean_kernel[(1,)](x, 100, BLOCK=128)  # a repeat: recorded once
    _broken_kernel[(1,)](x)
    _spilling_kernel[(1,)](x, BLOCK=16384, num_warps=1)
"""

TEST_SOURCE = """
import importlib.util
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _outside_kernel(x_ptr):  # outside sau_kernels: not recorded
    tl.store(x_ptr, 1.0)


def test_launch_probe():
    spec = importlib.util.spec_from_file_location({probe!r}, {path!r})
    module = importlib.util.module_from_spec(spec)
    sys.modules[{probe!r}] = module
    spec.loader.exec_module(module)
    module.launch_all()
    _outside_kernel[(1,)](torch.zeros(1))
"""


def _run(command: list[str], cwd: Path, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def lane_run(tmp_path_factory):
    """(launches recorded, compile report, compile process) for the planted kernels."""
    tmp = tmp_path_factory.mktemp("compile_lane")
    (tmp / "probe_kernels.py").write_text(PROBE_SOURCE, encoding="utf-8")
    test_file = tmp / "test_probe.py"
    test_file.write_text(
        TEST_SOURCE.format(probe=PROBE, path=str(tmp / "probe_kernels.py")), encoding="utf-8"
    )
    launches, report = tmp / "launches.json", tmp / "report.json"
    record = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    record += ["-p", "tests.compile.recorder", f"--record-launches={launches}", str(test_file)]
    recorded = _run(record, ROOT, interpret=True)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    compile_step = [sys.executable, "-m", "tests.compile.lane", str(launches), "--targets=90"]
    compile_step += ["--skip-coverage", f"--out={report}", f"--cache-dir={tmp / 'cache'}"]
    compiled = _run(compile_step, ROOT, interpret=False)
    doc = json.loads(launches.read_text(encoding="utf-8"))
    return doc["launches"], json.loads(report.read_text(encoding="utf-8")), compiled


def _rows(report: dict, kernel: str) -> list[dict]:
    return [row for row in report["rows"] if row["kernel"] == f"{PROBE}.{kernel}"]


def test_the_recorder_sees_a_new_module_without_a_list(lane_run):
    launches, _, _ = lane_run
    assert {launch["kernel"] for launch in launches} == {
        f"{PROBE}._clean_kernel",
        f"{PROBE}._broken_kernel",
        f"{PROBE}._spilling_kernel",
    }
    clean = [launch for launch in launches if launch["qualname"] == "_clean_kernel"]
    assert sorted(launch["signature"]["n"] for launch in clean) == ["constexpr", "i32", "i64"]
    assert all(launch["signature"]["x_ptr"] == "*fp32" for launch in clean)
    assert all(launch["constexprs"]["BLOCK"] == 128 for launch in clean)
    wide = next(launch for launch in clean if launch["signature"]["n"] == "i64")
    assert wide["attrs"] == {"x_ptr": "D", "n": "D"}  # 2**33 and the pointer: 16-divisible
    one = next(launch for launch in clean if launch["signature"]["n"] == "constexpr")
    assert one["constexprs"]["n"] == 1
    spill = next(launch for launch in launches if launch["qualname"] == "_spilling_kernel")
    assert spill["options"] == {"num_warps": 1}
    assert spill["first_test"].endswith("test_probe.py::test_launch_probe")


def test_a_compile_error_the_interpreter_accepts_fails_the_lane(lane_run):
    _, report, compiled = lane_run
    assert compiled.returncode == 1
    (row,) = _rows(report, "_broken_kernel")
    assert "_double" in row["error"]
    assert lane.problems(row)[0].startswith("compile error")
    assert f"FAIL {PROBE}._broken_kernel sm_90: compile error" in compiled.stdout


def test_register_spills_fail_the_lane(lane_run):
    _, report, compiled = lane_run
    (row,) = _rows(report, "_spilling_kernel")
    assert row["stack"] > 0 and row["num_warps"] == 1
    assert any(p.startswith("local memory") for p in lane.problems(row))
    assert f"FAIL {PROBE}._spilling_kernel sm_90: local memory" in compiled.stdout


def test_a_clean_kernel_passes_and_a_register_budget_binds(lane_run):
    _, report, compiled = lane_run
    rows = _rows(report, "_clean_kernel")
    assert len(rows) == 3  # i32 and i64 (the two value extremes) and the constant 1
    assert all(lane.problems(row) == [] for row in rows)
    row = rows[0]
    assert 0 < row["regs"] <= lane.DEFAULT_REGISTER_BUDGET and row["stack"] == 0
    assert lane.problems(row, {row["kernel"]: row["regs"]}) == []
    assert lane.problems(row, {row["kernel"]: row["regs"] - 1}) == [
        f"registers: {row['regs']} > budget {row['regs'] - 1}"
    ]
    assert f"FAIL {PROBE}._clean_kernel" not in compiled.stdout


def test_every_kernel_of_sau_kernels_must_be_launched():
    kernels = lane.unlaunched([], ["sau_kernels"])
    assert "sau_kernels.accumulate._accumulate_sq_grad_kernel" in kernels
    assert "sau_kernels.radix._digit_mass_kernel" in kernels
    assert not any(name.endswith("_tl") for name in kernels)  # device helpers are not kernels
    launched = [{"kernel": name} for name in kernels]
    assert lane.unlaunched(launched, ["sau_kernels"]) == []
    assert set(lane.REGISTER_BUDGETS) <= set(kernels)  # no budget for a kernel that is gone


def _launch(n_type: str, hinted: bool, block: int = 128) -> dict:
    return {
        "kernel": "k",
        "signature": {"x_ptr": "*fp32", "n": n_type, "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": block},
        "attrs": {"x_ptr": "D", **({"n": "D"} if hinted else {})},
        "options": {},
    }


def test_value_extremes_keep_both_ends_of_each_code_shape():
    variants = [_launch(t, h) for t in ("i32", "i64") for h in (False, True)]
    chosen = lane.value_extremes(variants + [_launch("i32", False, block=256)])
    assert _launch("i32", True) in chosen  # narrowest, most hints
    assert _launch("i64", False) in chosen  # widest, fewest hints
    assert _launch("i32", False, block=256) in chosen  # another code shape: kept alone
    assert len(chosen) == 3
