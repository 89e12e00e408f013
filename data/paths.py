"""Resolve user paths the same way from any working directory.

The shipped demo corpus lives inside the `data` package (data/corpora), so a relative path
that does not exist under the current directory is looked up under the project root (the
directory that holds the `data` package). That makes `data/corpora` in a YAML file work from
any cwd, editable install or not.
"""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
SHIPPED_CORPUS = PACKAGE_DIR / "corpora"


def resolve_path(path: str | Path) -> Path:
    """Absolute paths as given; relative ones against cwd if they exist there, else the project root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if p.exists():
        return p.resolve()
    candidate = PROJECT_ROOT / p
    return candidate if candidate.exists() else p.resolve()
