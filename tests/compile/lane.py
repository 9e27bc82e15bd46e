"""The compile lane: compile the recorded kernel specializations for real GPU targets.

The interpreter lane runs the kernels on the CPU, where Triton's compiler never runs: a
kernel the interpreter accepts may still be rejected by the compiler, spill registers to
local memory, or need more registers than its occupancy allows. This step takes the
specializations `tests.compile.recorder` wrote and compiles them, without a GPU, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` (Triton's own
lowering, then the ``ptxas`` shipped in the Triton wheel) for sm_80, sm_90, sm_100 and
sm_120 (a target is left out, with a line saying so, when the installed ptxas does not
know it), on at most two processes. Each cubin's resources are read with the wheel's
``cuobjdump -res-usage``.

Which specializations. Triton specializes integer arguments on their value (i32 or i64,
the constant 1, divisible by 16 or not), so a kernel fed per-call integers (salts, offsets,
digit shifts) records many specializations that share one code shape: the same kernel,
pointer types and alignment, constexprs, constants and launch options. By default the lane
compiles, per code shape, its two value extremes: the widest integers with the fewest
divisibility hints, and the narrowest with the most (`value_extremes`). ``--all`` compiles
every recorded specialization.

It fails (exit status 1) on a compile error, on any local memory (register spills or a
stack frame), on registers above a kernel's budget (`REGISTER_BUDGETS`, else
`DEFAULT_REGISTER_BUDGET`), on shared memory past the target's limit, and on a
``*_kernel`` jit function of the recorded packages that no launch reached. It prints a
table per kernel and target and writes every compile as JSON.

    python -m tests.compile.lane runs/compile-lane/launches.json \
        --out runs/compile-lane/report.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.backends.nvidia.compiler import CUDAOptions, get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGETS = (80, 90, 100, 120)
# 128 registers a thread keep four 4-warp programs resident an SM (65536 registers /
# (128 x 128 threads)): enough warps for a memory-bound kernel to keep loads in flight.
DEFAULT_REGISTER_BUDGET = 128
# Kernels allowed more than the default, one reason each (qualified name: registers).
REGISTER_BUDGETS: dict[str, int] = {
    # The mass histogram sums q over a one-hot [BLOCK, NUM_BINS] int64 tile (exact, no
    # float and no contended atomics). BLOCK = 32, NUM_BINS = 256: 8192 int64 values over
    # the 128 threads of a 4-warp program, 128 32-bit registers a thread for the tile
    # alone, plus the int64 accumulator (2 bins a thread), keys, q and addresses: 120-164
    # on sm_80..sm_120, none spilled. 168 is the most at which three programs stay
    # resident an SM (3 x 168 x 128 <= 65536); BLOCK = 64 needed 256 and spilled.
    "sau_kernels.radix._digit_mass_kernel": 168,
}
# Dynamic shared memory a program may use (opt-in maximum a block; CUDA programming guide):
# A100, H100/H200, B200, and the 99 KB of the consumer sm_120 parts. Past it, a launch
# raises OutOfResources.
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
INT_TYPES = ("i32", "i64", "u64")  # the integer types Triton picks from a value
JOBS = 2  # the 2-core machine the lane is sized for
USAGE = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def supported_targets(targets) -> tuple[list[int], list[int]]:
    """(targets the installed ptxas can compile for, targets it does not know)."""
    kept, dropped = [], []
    for cc in targets:
        ptxas = get_ptxas(cc).path
        help_text = subprocess.run([ptxas, "--help"], capture_output=True, text=True).stdout
        (kept if f"'{sm_arch_from_capability(cc)}'" in help_text else dropped).append(cc)
    return kept, dropped


def _code_shape(launch: dict) -> str:
    """A launch without the value specialization of its integer arguments (i32 or i64,
    divisible by 16 or not); an integer equal to 1 stays a constant, part of the shape."""
    sig = launch["signature"]
    ints = {name for name, ty in sig.items() if ty in INT_TYPES}
    shape = [
        launch["kernel"],
        {name: "int" if name in ints else ty for name, ty in sig.items()},
        launch["constexprs"],
        {name: attr for name, attr in launch["attrs"].items() if name not in ints},
        launch["options"],
    ]
    return json.dumps(shape, sort_keys=True)


def _generality(launch: dict) -> tuple[int, int, str]:
    """Orders a code shape's launches: more i64 integers, then fewer divisibility hints
    on them, sort later (the last is the most general); ties broken by the record."""
    sig = launch["signature"]
    ints = [name for name, ty in sig.items() if ty in INT_TYPES]
    wide = sum(sig[name] != "i32" for name in ints)
    hinted = sum(name in launch["attrs"] for name in ints)
    return wide, -hinted, json.dumps(launch, sort_keys=True)


def value_extremes(launches: list[dict]) -> list[dict]:
    """Per code shape, its least and most general launch (one when they are the same)."""
    shapes = defaultdict(list)
    for launch in launches:
        shapes[_code_shape(launch)].append(launch)
    chosen = []
    for group in shapes.values():
        group.sort(key=_generality)
        chosen += group[:1] + group[1:][-1:]
    return chosen


def _load_kernel(launch: dict) -> JITFunction:
    """The JITFunction a launch record names: by module name, else from its source file
    (a module loaded from a path, e.g. one a test plants)."""
    name = launch["module"]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(name, launch["file"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    kernel = module
    for part in launch["qualname"].split("."):
        kernel = getattr(kernel, part)
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{launch['kernel']} is not a @triton.jit function here")
    return kernel


def _constexpr(value):
    """Inverse of the recorder's JSON encoding of a constexpr value."""
    if not isinstance(value, dict):
        return value
    if "dtype" in value:
        return tl.dtype(value["dtype"])
    if "jit" in value:
        module, _, qualname = value["jit"].partition(":")
        return _load_kernel({"module": module, "qualname": qualname, "kernel": value["jit"]})
    raise TypeError(f"constexpr value the lane cannot rebuild: {value}")


def _resource_usage(cubin: bytes, name: str) -> dict:
    """registers, stack frame and local memory (bytes a thread) of `name` in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    rows = {m[1]: [int(v) for v in m.groups()[1:]] for m in USAGE.finditer(out)}
    if name not in rows:
        raise RuntimeError(f"cuobjdump reported no function {name}:\n{out}")
    regs, stack, _, local = rows[name]
    # a noinline device function has its own entry; its frame is local memory too
    return {"regs": regs, "stack": max(r[1] for r in rows.values()), "local": local}


def compile_launch(launch: dict, cc: int) -> dict:
    """Compile one recorded specialization for sm_`cc`; a row of the report."""
    row = {"kernel": launch["kernel"], "target": f"sm_{cc}", "cc": cc, "launch": launch}
    start = time.perf_counter()
    try:
        kernel = _load_kernel(launch)
        unknown = set(launch["options"]) - set(CUDAOptions.__dataclass_fields__)
        if unknown:
            raise KeyError(f"launch options Triton does not know: {sorted(unknown)}")
        constexprs = {k: _constexpr(v) for k, v in launch["constexprs"].items()}
        attrs = {
            (kernel.arg_names.index(k),): BaseBackend.parse_attr(v)
            for k, v in launch["attrs"].items()
        }
        src = ASTSource(kernel, launch["signature"], constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=launch["options"])
        row.update(_resource_usage(compiled.asm["cubin"], compiled.metadata.name))
        row["shared"] = compiled.metadata.shared
        row["num_warps"] = compiled.metadata.num_warps
    except Exception as exc:  # every failure is a row of the report, not a crash
        row["error"] = f"{type(exc).__name__}: {exc}"[:4000]
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def problems(row: dict, budgets=None) -> list[str]:
    """Why a compiled row fails the lane (empty when it passes)."""
    budgets = REGISTER_BUDGETS if budgets is None else budgets
    if "error" in row:
        lines = [line.strip() for line in row["error"].splitlines() if line.strip()]
        where = "" if len(lines) < 2 else f"{lines[0]} "  # a CompilationError: "at 3:27:"
        return [f"compile error: {where}{lines[-1][:200] if lines else ''}"]
    out = []
    if row["stack"] or row["local"]:
        out.append(f"local memory: {row['stack']} B stack frame, {row['local']} B local (spills)")
    limit = SHARED_LIMITS.get(row["cc"])
    if limit is not None and row["shared"] > limit:
        out.append(f"shared memory: {row['shared']} B > {limit} B a block")
    budget = budgets.get(row["kernel"], DEFAULT_REGISTER_BUDGET)
    if row["regs"] > budget:
        out.append(f"registers: {row['regs']} > budget {budget}")
    return out


def unlaunched(launches: list[dict], packages) -> list[str]:
    """`*_kernel` jit functions defined in `packages` that no recorded launch reached."""
    seen = {launch["kernel"] for launch in launches}
    found = set()
    for package in packages:
        root = importlib.import_module(package)
        names = [package] + [
            m.name for m in pkgutil.walk_packages(root.__path__, prefix=package + ".")
        ]
        for name in names:
            module = importlib.import_module(name)
            for attr, value in vars(module).items():
                if isinstance(value, JITFunction) and value.fn.__module__ == name:
                    if attr.endswith("_kernel"):
                        found.add(f"{name}.{value.fn.__qualname__}")
    return sorted(found - seen)


def _failures(rows: list[dict]) -> list[str]:
    """One line per kernel, target and kind of problem: the worst row's, and how many."""
    worst_first = sorted(rows, key=lambda r: (-r.get("regs", 0), -r.get("stack", 0)))
    found: dict[tuple, list] = {}
    for row in worst_first:
        for problem in problems(row):
            key = (row["kernel"], row["cc"], problem.partition(":")[0])
            found.setdefault(key, [f"{row['kernel']} {row['target']}: {problem}", 0])[1] += 1
    lines = []
    for _, (line, count) in sorted(found.items()):
        lines.append(line if count == 1 else f"{line} (and {count - 1} more specializations)")
    return lines


def _short(kernel: str) -> str:
    return kernel.removeprefix("sau_kernels.")


def summary(rows: list[dict], budgets=None) -> list[dict]:
    """One line per (kernel, target): specializations, worst registers/local/shared."""
    budgets = REGISTER_BUDGETS if budgets is None else budgets
    groups = defaultdict(list)
    for row in rows:
        groups[row["kernel"], row["cc"]].append(row)
    lines = []
    for (kernel, cc), group in sorted(groups.items()):
        built = [r for r in group if "error" not in r]
        lines.append(
            {
                "kernel": kernel,
                "target": f"sm_{cc}",
                "specializations": len(group),
                "errors": len(group) - len(built),
                "regs": max((r["regs"] for r in built), default=None),
                "budget": budgets.get(kernel, DEFAULT_REGISTER_BUDGET),
                "local": max((r["stack"] + r["local"] for r in built), default=None),
                "shared": max((r["shared"] for r in built), default=None),
                "seconds": round(sum(r["seconds"] for r in group), 2),
                "ok": not any(problems(r, budgets) for r in group),
            }
        )
    return lines


def table(lines: list[dict]) -> str:
    head = f"{'kernel':<42} {'target':<7} {'specs':>5} {'regs':>9} {'local':>6} {'shared':>7}"
    out = [head + f" {'seconds':>8}  status", "-" * (len(head) + 17)]
    for line in lines:
        regs = "-" if line["regs"] is None else f"{line['regs']}/{line['budget']}"
        out.append(
            f"{_short(line['kernel']):<42} {line['target']:<7} {line['specializations']:>5} "
            f"{regs:>9} {_dash(line['local']):>6} {_dash(line['shared']):>7} "
            f"{line['seconds']:>8.2f}  {'ok' if line['ok'] else 'FAIL'}"
        )
    return "\n".join(out)


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _pool_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    # Keep the cubins and their metadata only (not every IR): a tenth of the disk, and all
    # a rerun needs to skip compiling what has not changed.
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"


def compile_all(launches: list[dict], targets, jobs: int, cache_dir: str) -> list[dict]:
    """Every launch for every target, on `jobs` fresh processes without the interpreter."""
    # Spawned workers start from this environment: without TRITON_INTERPRET, @triton.jit
    # gives JITFunctions that compile.
    os.environ.pop("TRITON_INTERPRET", None)
    # Kernels with the most arguments (the slowest to compile) first: the processes end
    # together.
    tasks = sorted(
        ((launch, cc) for launch in launches for cc in targets),
        key=lambda task: -len(task[0]["signature"]),
    )
    context = get_context("spawn")
    with ProcessPoolExecutor(jobs, context, _pool_init, (cache_dir,)) as pool:
        futures = [pool.submit(compile_launch, launch, cc) for launch, cc in tasks]
        return [future.result() for future in futures]


def run_lane(
    recorded: dict, targets, *, every: bool, jobs: int, cache_dir: str, coverage: bool
) -> dict:
    """Compile the recorded launches (their value extremes, or `every` one); the report."""
    launches = recorded["launches"]
    chosen = launches if every else value_extremes(launches)
    start = time.perf_counter()
    rows = compile_all(chosen, targets, jobs, cache_dir)
    wall = round(time.perf_counter() - start, 2)
    failures = _failures(rows)
    if not launches:
        failures.append("no launch was recorded: did the interpreter lane run with the recorder?")
    if coverage:
        missing = unlaunched(launches, recorded["packages"])
        failures += [f"{kernel}: never launched in the interpreter lane" for kernel in missing]
    seconds = defaultdict(float)
    for row in rows:
        seconds[row["target"]] += row["seconds"]
    return {
        "triton": triton.__version__,
        "targets": [f"sm_{cc}" for cc in targets],
        "recorded_specializations": len(launches),
        "compiled_specializations": len(chosen),
        "jobs": jobs,
        "wall_seconds": wall,
        "compile_seconds_per_target": {t: round(v, 2) for t, v in seconds.items()},
        "failures": failures,
        "summary": summary(rows),
        "rows": rows,
    }


def _arguments(argv):
    parser = argparse.ArgumentParser(
        prog="python -m tests.compile.lane", description=__doc__.split("\n")[0]
    )
    parser.add_argument("launches", type=Path, help="JSON written by the recorder")
    parser.add_argument("--out", type=Path, default=Path("runs/compile-lane/report.json"))
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="e.g. 80,90")
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"processes (at most {JOBS})")
    parser.add_argument("--all", action="store_true", help="every recorded specialization")
    parser.add_argument("--cache-dir", help="Triton cache (default: triton-cache beside --out)")
    parser.add_argument(
        "--skip-coverage",
        action="store_true",
        help="do not require a launch of every *_kernel of the recorded packages",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _arguments(argv)
    recorded = json.loads(args.launches.read_text(encoding="utf-8"))
    targets, dropped = supported_targets(int(t) for t in args.targets.split(","))
    for cc in dropped:
        print(f"sm_{cc}: not known to the installed ptxas, left out")
    report = run_lane(
        recorded,
        targets,
        every=args.all,
        jobs=max(1, min(args.jobs, JOBS)),
        cache_dir=args.cache_dir or str(args.out.parent / "triton-cache"),
        coverage=not args.skip_coverage,
    )
    report["skipped_targets"] = [f"sm_{cc}" for cc in dropped]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(table(report["summary"]))
    print(
        f"{report['compiled_specializations']} of {report['recorded_specializations']} "
        f"recorded specializations x {len(targets)} targets on {report['jobs']} processes: "
        f"{report['wall_seconds']} s; compile seconds a target: "
        f"{report['compile_seconds_per_target']}"
    )
    print(f"report: {args.out}")
    for failure in report["failures"]:
        print(f"FAIL {failure}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    if os.environ.pop("TRITON_INTERPRET", None) is not None:
        # triton was imported in interpreter mode: start again without it
        os.execv(sys.executable, [sys.executable, "-m", "tests.compile.lane", *sys.argv[1:]])
    sys.exit(main())
