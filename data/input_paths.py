"""Where the inputs are: glob patterns expanded, and the language a file's path names.

Users often quote a glob (`--input 'corpus/data/*/train/*.parquet'`) so the shell leaves it
alone; it is expanded here, with `**` for any depth. The root of a glob is its leading folders
without wildcards (`corpus/data` above), and languages are read from the path below it.

The language of a path (`--lang-from-path`), FineWeb-2's layout `data/<language>/train/*.parquet`
being the model:
  1. the folder directly below the last folder named `data` among the file's folders below the
     input root (for a file given by name: among all its folders);
  2. else the first folder below the input root (a folder given, or a glob's leading folders);
  3. else none: the file's rows keep their own language field, else the file's name.
"""
import glob
from pathlib import Path

from data.errors import DataError
from data.paths import PROJECT_ROOT, resolve_path

_WILDCARDS = set("*?[")
LANG_ANCHOR = "data"


def has_wildcards(raw: str | Path) -> bool:
    return bool(_WILDCARDS & set(str(raw)))


def input_paths(raw: str | Path) -> tuple[Path | None, list[Path]]:
    """(root for languages or None for a file given by name, the paths one --input names)."""
    path = resolve_path(raw)
    if path.exists() or not has_wildcards(raw):
        if not path.exists():
            raise DataError(f"input not found: {raw}")
        return (path if path.is_dir() else None), [path]
    pattern = Path(str(raw)).expanduser()
    # Relative patterns: against cwd first, then the project root (as resolve_path does).
    bases = [pattern] if pattern.is_absolute() else [Path.cwd() / pattern, PROJECT_ROOT / pattern]
    for base in bases:
        matches = sorted(Path(p) for p in glob.glob(str(base), recursive=True))
        if matches:
            return glob_root(base), [m.resolve() for m in matches]
    raise DataError(f"no file matches the pattern: {raw}")


def glob_root(pattern: Path) -> Path:
    """The leading folders of a pattern, up to its first part with a wildcard."""
    fixed = []
    for part in pattern.parts:
        if has_wildcards(part):
            break
        fixed.append(part)
    return Path(*fixed).resolve()


def language_from_path(path: Path, root: Path | None) -> str | None:
    """The language a file's (or dataset dir's) path names, by the rule in the module docstring."""
    below_root = root is not None and path.is_relative_to(root) and path != root
    folders = (path.relative_to(root) if below_root else path).parts[:-1]
    anchors = [i for i, folder in enumerate(folders[:-1]) if folder == LANG_ANCHOR]
    if anchors:
        return folders[anchors[-1] + 1]
    if below_root and folders:
        return folders[0]
    return None
