"""Read the per-document token counts of a megatron-core .idx file without importing megatron.

Used to derive blend weights from token counts and to find, before megatron-core builds its
indices, which datasets hold at least one sample in each split (megatron-core loops
forever on an empty split). The counts are kept per file version, so each .idx of a blend of
thousands is read once per process, not once per question.
"""
import functools
import struct
from pathlib import Path

import numpy as np

from data.errors import DataError

_HEADER = b"MMIDIDX\x00\x00"


def document_lengths(prefix: str | Path) -> np.ndarray:
    """Tokens per sequence (= per document, as our preprocessing writes them) of a dataset."""
    path = Path(f"{prefix}.idx")
    if not path.is_file() or not Path(f"{prefix}.bin").is_file():
        raise DataError(f"no indexed dataset at {prefix} (.bin/.idx missing)")
    with open(path, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != _HEADER:
            raise DataError(f"{path} is not a megatron-core index file")
        (count,) = struct.unpack("<Q", head[18:26])
        lengths = np.frombuffer(f.read(4 * count), dtype=np.int32)
    if lengths.size != count:
        raise DataError(f"{path} is truncated")
    return lengths


def split_token_counts(prefix: str | Path, split_matrix) -> list[int | None]:
    """Tokens in each split's document range, bounded exactly as megatron-core bounds them."""
    return token_counts(prefix, split_matrix)[1]


def token_counts(prefix: str | Path, split_matrix) -> tuple[int, list[int | None]]:
    """(tokens of the dataset, tokens of each split), the .idx read once per version of the file:
    a blend's weights and each split's fit ask for the same prefix several times."""
    stat = Path(f"{prefix}.idx").stat() if Path(f"{prefix}.idx").is_file() else None
    key = tuple(None if b is None else (float(b[0]), float(b[1])) for b in split_matrix)
    if stat is None:
        return _count(str(prefix), key)  # raises the missing-file DataError
    return _cached_count(str(prefix), stat.st_size, stat.st_mtime_ns, key)


@functools.lru_cache(maxsize=65536)
def _cached_count(prefix: str, _size: int, _mtime_ns: int, split_matrix: tuple) -> tuple[int, list[int | None]]:
    return _count(prefix, split_matrix)


def _count(prefix: str, split_matrix: tuple) -> tuple[int, list[int | None]]:
    lengths = document_lengths(prefix)
    n = len(lengths)
    counts = []
    for bounds in split_matrix:
        if bounds is None:
            counts.append(None)
            continue
        begin, end = int(round(bounds[0] * float(n))), int(round(bounds[1] * float(n)))
        counts.append(int(lengths[begin:end].sum()))
    return int(lengths.sum()), counts


def split_matrix(data_split: str) -> list:
    """megatron-core's own [begin, end) fractions per split (None for a split given 0)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(data_split))
