"""benchmarks/gpu_runner.py: failures reach the exit code; module state is restored."""

from __future__ import annotations

from types import SimpleNamespace

import sau_kernels as K
from benchmarks import gpu_runner


def test_failed_sections_finds_every_kind_of_failure():
    sections = {
        "pytest_kernels": {"returncode": 1, "summary": "2 failed"},
        "check_accumulate": {"float32": {"ok": True}, "bfloat16": {"ok": True}},
        "check_adamw": {"float32": {"ok": True}, "bfloat16": {"ok": False}},
        "time_select": {"error": "Traceback ..."},
        "time_accumulate": [{"sau_ms": 1.0}, {"sau_ms": 2.0}],
        "time_step_fp32": {"torch_fused_ms": None, "torch_fused_error": "not on CPU"},
    }
    assert gpu_runner.failed_sections(sections) == ["pytest_kernels", "check_adamw", "time_select"]
    assert gpu_runner.failed_sections({"pytest_kernels": {"returncode": 0}}) == []


def test_main_exits_non_zero_when_a_check_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_runner, "check_accumulate", lambda n: {"f": {"ok": False}})
    for name in ("check_select", "check_adamw"):
        monkeypatch.setattr(gpu_runner, name, lambda shape: {"f": {"ok": True}})
    for name in ("time_accumulate", "time_select"):
        monkeypatch.setattr(gpu_runner, name, lambda arg: {})
    monkeypatch.setattr(gpu_runner, "time_step", lambda shapes, dtype, bandwidth: {})
    monkeypatch.setattr(gpu_runner, "copy_bandwidth", lambda nbytes: 1.0)
    assert gpu_runner.main(["--tiny", "--skip-pytest", "--out", str(tmp_path)]) == 1
    monkeypatch.setattr(gpu_runner, "check_accumulate", lambda n: {"f": {"ok": True}})
    assert gpu_runner.main(["--tiny", "--skip-pytest", "--out", str(tmp_path)]) == 0


def test_check_adamw_ok_includes_the_moments(monkeypatch):
    from sau_kernels import reference as R

    real = R.masked_adamw_

    def off_by_a_little(param, grad, m, v, index, **kw):
        real(param, grad, m, v, index, **kw)
        m.add_(1e-3)  # params agree, the first moment does not

    def torch_path(*args, backend=None, **kw):  # runs anywhere; the check is what is tested
        return K.masked_adamw_(*args, backend="torch", **kw)

    monkeypatch.setattr(gpu_runner, "K", SimpleNamespace(masked_adamw_=torch_path))
    assert all(r["ok"] for r in gpu_runner.check_adamw((64, 48)).values())
    monkeypatch.setattr(R, "masked_adamw_", off_by_a_little)
    out = gpu_runner.check_adamw((64, 48))
    assert all(not r["ok"] and r["unselected_bitwise_unchanged"] for r in out.values())
