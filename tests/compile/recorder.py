"""Pytest plugin: record how every Triton kernel of `sau_kernels` is launched.

Under ``TRITON_INTERPRET=1`` a ``@triton.jit`` function is an ``InterpretedFunction``, and
every launch ``kernel[grid](...)`` goes through ``InterpretedFunction.run``. This plugin
wraps that one method, so a kernel added to any module under `sau_kernels` later is
recorded without being named anywhere. For each launch it computes the specialization the
CUDA JIT would compile, with Triton's own binder (``create_function_from_signature``, the
code ``JITFunction.run`` uses): pointer element types, i32/i64 from each integer's value
(an integer equal to 1 becomes the constant 1), divisibility by 16 of pointers and
integers, constexpr values, and launch options such as ``num_warps``. CPU tensors are at
least 64-byte aligned, so a pointer's divisibility by 16 is the one a CUDA allocation
(256-byte aligned) with the same element offset would have.

Use: ``TRITON_INTERPRET=1 python -m pytest -p tests.compile.recorder
--record-launches=runs/compile-lane/launches.json tests/kernels``. The distinct
specializations are written as JSON at the end of the session; ``tests.compile.lane``
compiles them.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

PACKAGES = ("sau_kernels",)


def _in_packages(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _jsonable(value):
    """A constexpr value as JSON: numbers, bools, strings and None as they are, a Triton
    dtype as {"dtype": name}, a jit function as {"jit": "module:qualname"}; anything else as
    {"unsupported": repr}, which the compile step reports as an error."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    fn = getattr(value, "fn", None)
    if fn is not None and hasattr(fn, "__qualname__"):
        return {"jit": f"{fn.__module__}:{fn.__qualname__}"}
    return {"unsupported": repr(value)}


class LaunchRecorder:
    """Records the distinct specializations of launches of kernels under `packages`."""

    def __init__(self, packages=PACKAGES):
        self.packages = tuple(packages)
        self.records: dict[str, dict] = {}
        self.current_test: str | None = None
        self._binders: dict = {}
        self._original_run = None

    def install(self) -> None:
        original = InterpretedFunction.run
        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            if _in_packages(getattr(kernel.fn, "__module__", ""), recorder.packages):
                recorder.record(kernel, args, kwargs)
            return original(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        self._original_run = original
        InterpretedFunction.run = run

    def uninstall(self) -> None:
        if self._original_run is not None:
            InterpretedFunction.run = self._original_run
            self._original_run = None

    def _binder(self, kernel):
        """(JITFunction twin of an interpreted kernel, its CUDA argument binder), cached."""
        if kernel.fn not in self._binders:
            twin = JITFunction(kernel.fn, **kernel.kwargs)
            # Specialization is the same for every CUDA target; sm_90 is just one of them.
            backend = make_backend(GPUTarget("cuda", 90, 32))
            binder = create_function_from_signature(twin.signature, twin.params, backend)
            self._binders[kernel.fn] = (twin, binder)
        return self._binders[kernel.fn]

    def record(self, kernel, args, kwargs) -> None:
        twin, binder = self._binder(kernel)
        bound, specialization, options = binder(*args, **kwargs)
        names = [p.name for p in twin.params]
        fn = kernel.fn
        spec = {
            "kernel": f"{fn.__module__}.{fn.__qualname__}",
            "module": fn.__module__,
            "qualname": fn.__qualname__,
            "file": inspect.getsourcefile(fn),
            "signature": {n: s[0] for n, s in zip(names, specialization)},
            "constexprs": {
                n: _jsonable(bound[n]) for n, s in zip(names, specialization) if s[0] == "constexpr"
            },
            "attrs": {
                n: s[1] for n, s in zip(names, specialization) if isinstance(s[1], str) and s[1]
            },
            "options": {k: _jsonable(v) for k, v in sorted(options.items())},
        }
        key = json.dumps(spec, sort_keys=True)
        if key not in self.records:
            self.records[key] = dict(spec, first_test=self.current_test)

    def write(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        launches = sorted(self.records.values(), key=lambda r: json.dumps(r, sort_keys=True))
        doc = {"packages": list(self.packages), "launches": launches}
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def pytest_addoption(parser):
    parser.addoption(
        "--record-launches",
        metavar="PATH",
        default=None,
        help="with TRITON_INTERPRET=1: write the specialization of every sau_kernels launch "
        "to PATH (JSON) for the compile lane",
    )


def pytest_configure(config):
    path = config.getoption("--record-launches")
    if path is None:
        return
    if not triton.knobs.runtime.interpret:
        raise pytest.UsageError("--record-launches needs TRITON_INTERPRET=1 (the interpreter lane)")
    recorder = LaunchRecorder()
    recorder.install()
    config._sau_launch_recorder = recorder


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    recorder = getattr(item.config, "_sau_launch_recorder", None)
    if recorder is not None:
        recorder.current_test = item.nodeid
    try:
        return (yield)
    finally:
        if recorder is not None:
            recorder.current_test = None


def pytest_sessionfinish(session):
    recorder = getattr(session.config, "_sau_launch_recorder", None)
    if recorder is None:
        return
    recorder.uninstall()
    recorder.write(session.config.getoption("--record-launches"))
