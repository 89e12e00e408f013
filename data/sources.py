"""Find the documents of a corpus: JSONL files (plain or compressed), Parquet and Arrow IPC files,
folders and glob patterns of them, and local Hugging Face `datasets` directories (saved with
`save_to_disk`).

A source yields raw records in a stable order: bytes lines for JSONL (decoded and parsed later,
in the worker, so a bad line is counted, not fatal) and dicts for `datasets`, Parquet and Arrow
rows. Each record carries its 1-based line (or 0-based row) number so a skipped one can be named
as file:line (file:row). A Parquet file can be read in pieces (ranges of row groups): the rows
keep the file's own numbers, so a row is named the same whichever piece reads it.
"""
import bz2
import gzip
import lzma
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from data.columnar import (ARROW_SUFFIXES, PARQUET_SUFFIXES, BadFile, iter_arrow_rows, iter_parquet_rows,
                           parquet_piece_sizes)
from data.errors import DataError
from data.input_paths import input_paths, language_from_path
from data.records import RecordKeys

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst", ".json.gz", ".ndjson")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_KIND_OF_SUFFIX = {**{s: "parquet" for s in PARQUET_SUFFIXES}, **{s: "arrow" for s in ARROW_SUFFIXES}}
# A folder written by datasets' save_to_disk holds one of these.
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Some Windows tools start a UTF-8 file with a byte-order mark: it marks the file, not the text.
UTF8_BOM = b"\xef\xbb\xbf"

__all__ = ["BadFile", "Source", "expand_inputs", "iter_records", "piece_sizes"]


@dataclass(frozen=True)
class Source:
    """One input: a JSONL, Parquet or Arrow file or a local HF dataset directory.

    `name` is its default group; `row_groups` a half-open range [lo, hi) of a Parquet file's row
    groups to read (None: the whole file); `lang` the language its path names (--lang-from-path),
    the group of its rows that have no language of their own.
    """

    path: Path
    kind: str  # "jsonl", "parquet", "arrow" or "hf"
    row_groups: tuple[int, int] | None = None
    lang: str | None = None

    @property
    def name(self) -> str:
        base = self.path.name
        for suffix in sorted(JSONL_SUFFIXES + tuple(_KIND_OF_SUFFIX), key=len, reverse=True):
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _HF_MARKERS)


def expand_inputs(inputs: list[str | Path], lang_from_path: bool = False) -> list[Source]:
    """Turn files, folders, glob patterns and HF dataset dirs into a sorted, de-duplicated list
    of sources; with lang_from_path each gets the language its path names (data.input_paths)."""
    found: dict[Path, Source] = {}
    for raw in inputs:
        root, paths = input_paths(raw)
        for path in paths:
            for source in _sources_at(path):
                lang = language_from_path(source.path, root) if lang_from_path else None
                found.setdefault(source.path, replace(source, lang=lang))
    if not found:
        raise DataError(f"no JSONL, Parquet or Arrow files or datasets found under: {', '.join(map(str, inputs))}")
    return [found[p] for p in sorted(found)]


def _sources_at(path: Path) -> list[Source]:
    if is_hf_dataset_dir(path):
        return [Source(path, "hf")]
    if not path.is_dir():
        return [Source(path, _kind_of(path.name) or "jsonl")]  # any other file name is read as JSONL
    sources = []
    for folder, subfolders, files in os.walk(path):
        here = Path(folder)
        if here != path and is_hf_dataset_dir(here):
            sources.append(Source(here, "hf"))
            subfolders.clear()  # its .arrow files belong to the dataset, not to us
            continue
        subfolders.sort()
        sources += [Source(here / f, kind) for f in sorted(files) if (kind := _kind_of(f))]
    return sources


def _kind_of(file_name: str) -> str | None:
    if file_name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return next((kind for suffix, kind in _KIND_OF_SUFFIX.items() if file_name.endswith(suffix)), None)


def piece_sizes(source: Source) -> list[int]:
    """Bytes of each piece a source can be split into: a Parquet file's row groups (compressed,
    from its footer, no data read; none for a file without rows); one piece for any other
    source, its size on disk. An unreadable Parquet file is one piece too, so that planning
    goes on and reading it names and counts it (or stops under --strict) like any bad file."""
    if source.kind == "parquet":
        try:
            return parquet_piece_sizes(source.path)
        except BadFile:
            return [source.path.stat().st_size]
    if source.kind == "hf":
        return [sum(p.stat().st_size for p in source.path.rglob("*") if p.is_file())]
    return [source.path.stat().st_size]


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


def iter_records(source: Source, keys: RecordKeys | None = None) -> Iterator[tuple[int, bytes | dict]]:
    """(line or row number, raw record) for every non-blank record of one source, in file order.

    With `keys`, Parquet and Arrow files read only the text and language columns and a file
    without the text column is a DataError; without, they read every column.
    """
    columns, required = ([keys.text, keys.lang], keys.text) if keys is not None else (None, None)
    if source.row_groups is not None and source.kind != "parquet" and source.row_groups != (0, 1):
        raise DataError(f"{source.path}: only Parquet files are read in row-group pieces")
    if source.kind == "parquet":
        yield from iter_parquet_rows(source.path, source.row_groups, columns, required)
    elif source.kind == "arrow":
        yield from iter_arrow_rows(source.path, columns, required)
    elif source.kind == "hf":
        yield from _iter_hf_rows(source.path)
    else:
        yield from _iter_jsonl_lines(source.path)


def _iter_jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with open_binary(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if lineno == 1 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM):]  # only there: further on, U+FEFF is content
                # Blank lines (a trailing newline, spacing) are conventional in JSONL, not bad data.
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise DataError(f"{path}: cannot read ({err})") from err


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
