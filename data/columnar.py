"""Read Parquet and Arrow IPC files (`.arrow`, `.feather`) as records, with bounded memory.

Parquet is read one row group at a time, in record batches of ~2 MB of decoded data, over
only the columns asked for: a file larger than RAM streams through, and reading it never needs
more than one batch (plus one page being decoded). Arrow IPC files are read one record batch at a
time (the batch is the unit the format stores, so its size is the writer's choice); both the
random-access file format and the stream format (what `datasets` writes) are accepted.

Each record is a dict {column: value} of the wanted columns, numbered by its 0-based row in the
file, so a row is named file:row whichever piece of the file it is read in. A file that is not
what its name says, or is truncated, raises BadFile naming it; a missing text column is a
DataError naming the columns the file does have.
"""
from pathlib import Path
from typing import Iterator

from data.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow", ".feather")
BATCH_BYTES = 2 << 20  # decoded bytes per record batch; a row larger than this comes alone
_MAX_BATCH_ROWS = 4096
_READ_BUFFER = 1 << 20  # stream each column chunk in 1 MB reads instead of reading it whole


class BadFile(DataError):
    """A file that cannot be read as the format its name says (not that format, truncated, corrupt)."""


def _pyarrow(path: Path):
    try:
        import pyarrow
    except ImportError as err:
        raise DataError(f"{path}: reading Parquet/Arrow needs the 'pyarrow' package") from err
    return pyarrow


def _errors(pa) -> tuple:
    # ArrowInvalid is a ValueError, ArrowIOError an OSError; both are ArrowException.
    return (pa.ArrowException, OSError, ValueError)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def open_parquet(path: Path):
    pa = _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path), buffer_size=_READ_BUFFER)
    except _errors(pa) as err:
        raise BadFile(f"{path}: not a readable Parquet file ({_one_line(err)})") from err


def parquet_piece_sizes(path: Path) -> list[int]:
    """Compressed on-disk bytes of each row group, from the footer alone (no data is read)."""
    meta = open_parquet(path).metadata
    return [sum(meta.row_group(i).column(j).total_compressed_size for j in range(meta.num_columns))
            for i in range(meta.num_row_groups)]


def _check_columns(path: Path, names: list[str], required: str | None) -> None:
    if required is not None and required not in names:
        raise DataError(f"{path}: no column '{required}' (the file has: {', '.join(names) or 'no columns'}); "
                        "choose the text column with --text-key")


def _wanted(names: list[str], columns: list[str] | None) -> list[str]:
    if columns is None:
        return list(names)
    return [c for c in dict.fromkeys(columns) if c in names]


def iter_parquet_rows(path: Path, row_groups: tuple[int, int] | None, columns: list[str] | None,
                      required: str | None) -> Iterator[tuple[int, dict]]:
    """(row in file, {column: value}) for the rows of row groups [lo, hi), in file order."""
    pa = _pyarrow(path)
    handle = open_parquet(path)
    names = handle.schema_arrow.names
    _check_columns(path, names, required)
    wanted = _wanted(names, columns)
    meta = handle.metadata
    lo, hi = _row_group_range(path, row_groups, meta.num_row_groups)
    row = sum(meta.row_group(i).num_rows for i in range(lo))  # the file's own row numbers
    for index in range(lo, hi):
        group = meta.row_group(index)
        batch_rows = _batch_rows(group, wanted)
        try:
            for batch in handle.iter_batches(batch_size=batch_rows, row_groups=[index], columns=wanted,
                                             use_threads=False):
                for record in batch.to_pylist():
                    yield row, record
                    row += 1
        except _errors(pa) as err:
            raise BadFile(f"{path}: row group {index} cannot be read, file truncated or corrupt "
                          f"({_one_line(err)})") from err


def _row_group_range(path: Path, row_groups: tuple[int, int] | None, count: int) -> tuple[int, int]:
    if row_groups is None:
        return 0, count
    lo, hi = row_groups
    if not 0 <= lo <= hi <= count:
        raise DataError(f"{path}: row groups [{lo}, {hi}) outside the file's {count}")
    return lo, hi


def _batch_rows(group, wanted: list[str]) -> int:
    """Rows per batch so one batch decodes to about BATCH_BYTES, from the row group's metadata."""
    wanted_set = set(wanted)
    size = sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
               if group.column(j).path_in_schema.split(".")[0] in wanted_set)
    per_row = max(size // max(group.num_rows, 1), 1)
    return max(1, min(_MAX_BATCH_ROWS, BATCH_BYTES // per_row))


def iter_arrow_rows(path: Path, columns: list[str] | None, required: str | None) -> Iterator[tuple[int, dict]]:
    """(row in file, {column: value}) of an Arrow IPC file or stream, one record batch at a time."""
    pa = _pyarrow(path)
    row = 0
    try:
        with pa.OSFile(str(path)) as handle:
            names = _ipc_reader(pa, handle, path).schema.names
            _check_columns(path, names, required)
            wanted = _wanted(names, columns)
            handle.seek(0)
            # Only the wanted columns are decoded: IPC reads fields selectively.
            options = pa.ipc.IpcReadOptions(included_fields=[names.index(c) for c in wanted])
            for batch in _ipc_batches(_ipc_reader(pa, handle, path, options)):
                for start in range(0, batch.num_rows, _MAX_BATCH_ROWS):
                    for record in batch.slice(start, _MAX_BATCH_ROWS).to_pylist():
                        yield row, record
                        row += 1
    except _errors(pa) as err:
        raise BadFile(f"{path}: Arrow data cannot be read after row {row}, file truncated or corrupt "
                      f"({_one_line(err)})") from err


def _ipc_reader(pa, handle, path: Path, options=None):
    start = handle.tell()
    try:
        return pa.ipc.open_file(handle, options=options)
    except _errors(pa):
        handle.seek(start)
    try:
        return pa.ipc.open_stream(handle, options=options)
    except _errors(pa) as err:
        raise BadFile(f"{path}: not an Arrow IPC file or stream ({_one_line(err)})") from err


def _ipc_batches(reader):
    if hasattr(reader, "get_batch"):  # the file format: random access by batch index
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader
