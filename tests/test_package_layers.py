"""The package graph runs one way: parallelism/ holds mechanisms and imports nothing from training/.

Read from the source (every import statement, at any depth, lazy imports inside functions
included), so a back edge fails here without anything being imported."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path, root: Path):
    """(line, module) for every import in a file; relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                yield node.lineno, ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.lineno, node.module


def back_edges(folder: str, forbidden: str, root: Path = ROOT):
    for path in sorted((root / folder).rglob("*.py")):
        for line, module in imported_modules(path, root):
            if module == forbidden or module.startswith(forbidden + "."):
                yield f"{path.relative_to(root)}:{line} imports {module}"


def test_parallelism_imports_nothing_from_training():
    assert list(back_edges("parallelism", "training")) == []


def test_the_walk_sees_a_lazy_import(tmp_path):
    """The walker itself: an import inside a function body is found (a check that could not fail
    would prove nothing)."""
    module = tmp_path / "parallelism" / "sneaky.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from training.model import bloom\n    return bloom\n")
    assert list(back_edges("parallelism", "training", tmp_path)) == ["parallelism/sneaky.py:2 imports training.model"]


PRODUCT = ("training", "parallelism", "data", "launch", "configs")


def module_graph(root: Path = ROOT) -> dict:
    """module -> the product modules it imports (`from a import b` counts a.b when b is a module)."""
    modules = {}
    for package in PRODUCT:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for _, imported in imported_modules(path, root):
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts:
                targets.add(".".join(parts))
        targets.update(t for t in submodules_imported(path, modules) if t != name)
        graph[name] = targets - {name}
    return graph


def submodules_imported(path: Path, modules: dict):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield from (f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_the_product():
    """The cycle that was (training/config/loader.py importing training/plan/planner.py, which
    imports it back) and any other: each module's imports, lazy ones included, form no loop."""
    assert cycles(module_graph()) == []


def test_the_cycle_finder_finds_a_lazy_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def loaded_by(module: str) -> list:
    """The heavy packages importing `module` pulls in, seen in a fresh interpreter."""
    probe = (f"import sys; import {module}; "
             "print(' '.join(m for m in ('torch', 'megatron.core', 'deepspeed', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.split()


@pytest.mark.parametrize("module", ["training.plan.planner", "training.plan.plan_report", "training.config.checks",
                                    "training.config.loader"])
def test_planning_and_validation_import_no_framework(module):
    """Planning a cluster and checking a config are questions about numbers: they must not wait on
    torch, megatron-core or DeepSpeed (8 s of imports here before this was fixed)."""
    assert loaded_by(module) == []


MAX_LINES = 450


def long_files(root: Path = ROOT) -> list:
    """Every .py file of the repository (product, benchmarks, tests, setup.py) over MAX_LINES."""
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0].startswith(".") or parts[0] in ("build",) or parts[0].endswith(".egg-info"):
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found.append(f"{path.relative_to(root)}: {lines} lines")
    return found


def test_no_source_file_over_450_lines():
    """A file per idea: one that grows past 450 lines holds more than one."""
    assert long_files() == []


def test_long_files_sees_a_long_file(tmp_path):
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "vendored.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_files(tmp_path) == [f"training/big.py: {MAX_LINES + 1} lines"]
