"""Write megatron-core's indexed dataset format (.bin tokens + .idx index), atomically.

The format is megatron-core's (`IndexedDataset` reads it; tests check that): the .idx holds a
header, the token count of each sequence, their byte offsets and the document boundaries; here
each document is one sequence. It is written with numpy instead of megatron's
IndexedDatasetBuilder so the preprocessing workers never import torch/megatron (3.5 s each).

Both files are written aside (`<prefix>.bin.tmp-<pid>`) and renamed only when complete: the
old .idx goes first, the .idx arrives last, so a reader never pairs a new .bin with a stale
.idx, and an interrupted run leaves only .tmp files that no reader opens.
"""
import os
import struct
from pathlib import Path

import numpy as np

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_VERSION = 1
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
                np.float32: 7, np.uint16: 8}


class IndexedWriter:
    """Append documents (1-D token arrays) to `<prefix>.bin`; `finalize()` makes them visible."""

    def __init__(self, prefix: str | Path, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype).type
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = self.prefix + ".bin" + suffix
        self._idx_tmp = self.prefix + ".idx" + suffix
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents whose tokens are concatenated in `tokens`."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += int(tokens.size)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())  # durable before it becomes visible under its final name
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        self._write_index(lengths)
        final_bin, final_idx = self.prefix + ".bin", self.prefix + ".idx"
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(self._bin_tmp, final_bin)
        os.replace(self._idx_tmp, final_idx)

    def abort(self) -> None:
        """Drop the partial files; the previous complete output, if any, stays untouched."""
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def _write_index(self, lengths: np.ndarray) -> None:
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * itemsize
        # One sequence per document: document boundaries are 0, 1, ..., n.
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as idx:
            idx.write(_INDEX_HEADER)
            idx.write(struct.pack("<Q", _VERSION))
            idx.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", len(lengths)))
            idx.write(struct.pack("<Q", len(document_indices)))
            idx.write(lengths.tobytes())
            idx.write(pointers.tobytes())
            idx.write(document_indices.tobytes())
            idx.flush()
            os.fsync(idx.fileno())


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete .tmp-<pid> files left by killed runs whose process no longer exists."""
    removed = []
    for path in directory.glob("*.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
