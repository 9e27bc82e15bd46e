"""The tree's own rules, read from the source: imports run one way down (sau_kernels <-
sau <- sau.lab <- sau.cli) with no cycle, sau/'s root holds the library only, no function
outside an argument parser exceeds 60 lines, and code cites no issue numbers or files
outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sau_kernels", "sau")
# The layers, lowest first; a module may import only from its own layer or below.
LAYERS = ("sau_kernels", "sau", "sau.lab", "sau.cli")
# `python -m sau` is the command line's entry point, whatever its folder.
ENTRY_POINTS = {"sau.__main__": "sau.cli"}
PARSERS = ("add_parser", "build_parser", "_axis_options")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    module = ENTRY_POINTS.get(module, module)
    best = 0
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            best = i
    return best


def _imports(module: str, path: Path) -> set[str]:
    """Every project module `module` imports, anywhere in the file (function bodies and
    TYPE_CHECKING blocks included: they are part of the graph too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub where there is one
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = subs or [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` of a package path
                target = target.rpartition(".")[0]
            if target and target != module:
                out.add(target)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_the_walk_sees_the_tree():
    assert {"sau_kernels.adamw", "sau.optim", "sau.lab.pipeline", "sau.cli.main"} <= set(GRAPH)
    assert "sau.lab.variants" in GRAPH["sau.lab.pipeline"]
    assert _layer("sau.lab.sweep.run") == 2 and _layer("sau.__main__") == 3


def test_imports_run_one_way_down():
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_import_cycle():
    """Tarjan's strongly connected components: every component is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []


def test_kernels_know_nothing_of_models():
    heavy = ("transformers", "torch.nn")
    for module, path in MODULES.items():
        if not module.startswith("sau_kernels"):
            continue
        text = path.read_text(encoding="utf-8")
        for name in heavy:
            assert not re.search(rf"^\s*(from|import) {re.escape(name)}\b", text, re.M), module


def test_sau_root_holds_the_library_only():
    root = {m for m in MODULES if m.startswith("sau.") and m.count(".") == 1}
    subpackages = {p.name for p in (ROOT / "sau").iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == {"unlearn", "lab", "cli", "integrations"}
    library = {m for m in root if m.rpartition(".")[2] not in subpackages}
    for module in library - {"sau.__main__"}:
        assert _layer(module) == 1 and all(_layer(t) <= 1 for t in GRAPH[module]), module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name not in PARSERS
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_code_and_docs_cite_no_issue_numbers_or_outside_files():
    pattern = re.compile(r"DESIGN\.md|\b[Ii]ssues? #?\d+|\(#\d+\)")
    files = [p for p in MODULES.values()]
    files += [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files += sorted((ROOT / "benchmarks").rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    hits = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in files
        if path.is_file() and path != Path(__file__)
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
