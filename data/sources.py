"""Find the documents of a corpus: JSONL files (plain or compressed), folders of them, and local
Hugging Face `datasets` directories (saved with `save_to_disk`).

A source yields raw records in a stable order: bytes lines for JSONL (decoded and parsed later,
in the worker, so a bad line is counted, not fatal) and dicts for `datasets` rows. Each record
carries its 1-based line (or 0-based row) number so a skipped one can be named as file:line.
"""
import bz2
import gzip
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data.errors import DataError
from data.paths import resolve_path

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst", ".json.gz", ".ndjson")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# A folder written by datasets' save_to_disk holds one of these.
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Some Windows tools start a UTF-8 file with a byte-order mark: it marks the file, not the text.
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Source:
    """One input: a JSONL file or a local HF dataset directory; `name` is its default group."""

    path: Path
    kind: str  # "jsonl" or "hf"

    @property
    def name(self) -> str:
        base = self.path.name
        for suffix in sorted(JSONL_SUFFIXES, key=len, reverse=True):
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _HF_MARKERS)


def expand_inputs(inputs: list[str | Path]) -> list[Source]:
    """Turn files, folders and HF dataset dirs into a sorted, de-duplicated list of sources."""
    found: dict[Path, Source] = {}
    for raw in inputs:
        path = resolve_path(raw)
        if not path.exists():
            raise DataError(f"input not found: {raw}")
        if is_hf_dataset_dir(path):
            found[path] = Source(path, "hf")
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.name.endswith(JSONL_SUFFIXES):
                    found[child] = Source(child, "jsonl")
                elif is_hf_dataset_dir(child):
                    found[child] = Source(child, "hf")
        else:
            found[path] = Source(path, "jsonl")
    if not found:
        raise DataError(f"no JSONL files or datasets found under: {', '.join(map(str, inputs))}")
    return [found[p] for p in sorted(found)]


def open_binary(path: Path):
    """Open a JSONL file for reading bytes, decompressing by suffix."""
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError as err:
            raise DataError(f"{path}: reading .zst needs the 'zstandard' package") from err
        import io

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return _OPENERS.get(path.suffix, open)(path, "rb")


def iter_records(source: Source) -> Iterator[tuple[int, bytes | dict]]:
    """(line number, raw record) for every non-blank record of one source, in file order."""
    if source.kind == "hf":
        yield from _iter_hf_rows(source.path)
        return
    try:
        with open_binary(source.path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if lineno == 1 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM):]  # only there: further on, U+FEFF is content
                # Blank lines (a trailing newline, spacing) are conventional in JSONL, not bad data.
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise DataError(f"{source.path}: cannot read ({err})") from err


def _iter_hf_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{path}: reading a Hugging Face dataset needs the 'datasets' package") from err
    loaded = datasets.load_from_disk(str(path))
    # A DatasetDict contributes all its splits, in name order, numbered continuously.
    parts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    row = 0
    for part in parts:
        for record in part:
            yield row, record
            row += 1
