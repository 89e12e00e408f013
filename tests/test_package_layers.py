"""The package graph runs one way: parallelism/ holds mechanisms and imports nothing from training/.

Read from the source (every import statement, at any depth, lazy imports inside functions
included), so a back edge fails here without anything being imported."""
import ast
from pathlib import Path

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
