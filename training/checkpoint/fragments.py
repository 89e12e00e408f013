"""Format 2 of the checkpoint: every rank writes the fragments it owns, and any layout reads them.

A fragment is a flat, contiguous range of one TP shard of one parameter: what a ZeRO partition
holds of it (stages 1-3 and DeepSpeed's BF16_Optimizer flatten each TP shard and cut the flat
groups at partition boundaries), or the whole TP shard without ZeRO. Each rank writes its own
fragments of the fp32 masters to model/rankNNNNN.safetensors and of Adam's moments to
optim/rankNNNNN.safetensors, each 1-D, and records in the file's safetensors metadata which slice
of which full tensor every key holds:

    {"<name>/<state>": {"name", "state", "shape": full shape, "tp_dim": split dim or null,
                        "tp_rank", "tp_size", "offset": start in the flattened TP shard, "numel"}}

So no rank gathers anything to save, and the bytes a rank writes and hashes are its own share.

Why not torch.distributed.checkpoint or DeepSpeed's universal checkpoint: DCP plans over
DTensor/ShardedTensor placements, which describe whole-dimension splits, not a flat range cut out
of a flattened TP shard at an arbitrary element (a ZeRO partition boundary falls mid-row); and
DeepSpeed's universal checkpoint is an offline conversion of its own per-rank files (ds_to_universal)
that gathers each parameter whole in one process. Both would force the gather this format avoids.
"""
import json
import os
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch
import xxhash

from training.checkpoint.file_image import CHUNK_BYTES, DIGEST, FileImage
from training.checkpoint.files import FORMAT_1, CheckpointError, matches, read_header, split_of

MASTER = "master"
METADATA_KEY = "fragments"


def fragment_file(kind: str, rank: int) -> str:
    """kind: "model" (fp32 masters) or "optim" (Adam moments)."""
    return f"{kind}/rank{rank:05d}.safetensors"


@dataclass(frozen=True)
class Fragment:
    name: str  # canonical parameter name (training/model/param_table.py)
    state: str  # "master", "exp_avg" or "exp_avg_sq"
    shape: tuple  # the full tensor's shape (all TP shards together)
    tp_dim: Optional[int]  # the dimension TP splits, None for a replicated parameter
    tp_rank: int
    tp_size: int
    offset: int  # where the fragment starts in the flattened TP shard
    numel: int

    @property
    def key(self) -> str:
        return f"{self.name}/{self.state}"

    def shard_shape(self) -> tuple:
        if self.tp_dim is None:
            return tuple(self.shape)
        shape = list(self.shape)
        shape[self.tp_dim] //= self.tp_size
        return tuple(shape)


def prepare_fragments(fragments: List[tuple], reuse: Optional[FileImage] = None) -> FileImage:
    """[(Fragment, 1-D tensor)] copied into the image of one file (the only copy a save makes);
    into `reuse` when it has the same layout (the previous save's image, already paged in)."""
    meta = {f.key: {**f.__dict__, "shape": list(f.shape)} for f, _ in fragments}
    layout, metadata = [(f.key, t.numel()) for f, t in fragments], {METADATA_KEY: json.dumps(meta)}
    image = reuse if reuse is not None and reuse.has_layout(layout, metadata) else FileImage(layout, metadata)
    image.sealed = False
    with torch.no_grad():
        for index, (_, tensor) in enumerate(fragments):
            image.tensor(index).copy_(tensor.detach().reshape(-1))
    return image


def write_fragments(path: Path, fragments: List[tuple]) -> dict:
    """Write [(Fragment, 1-D tensor)] to one file, durably; returns its manifest entry (each rank
    hashes only what it wrote)."""
    return prepare_fragments(fragments).write(path)


class FragmentReader:
    """Reads ranges of TP shards (or whole tensors) of a format-2 checkpoint, one tensor at a time.

    Every file's header is checked against the manifest when the reader opens the checkpoint;
    the 4 MiB chunks of a fragment that a read needs against their digests in that header
    (verify_range(), before any state changes), so a rank verifies what it reads, not whole
    files of other ranks. Files of manifests written before chunk digests are checked whole."""

    def __init__(self, directory: Path, manifest: dict, kind: str):
        self.directory, self.manifest = Path(directory), manifest
        self.index: Dict[str, List[tuple]] = defaultdict(list)  # key -> [(file, Fragment)]
        self.where: Dict[tuple, tuple] = {}  # (file, key) -> (first byte, chunk digests or None)
        self.verified = set()
        self.bytes_read = {"verify": 0, "load": 0}  # tensor bytes this reader read, per pass
        self.handles: Dict[str, int] = {}  # file -> open descriptor (close())
        format_1 = manifest.get("format") == FORMAT_1
        prefix = f"{kind}/tp" if format_1 else f"{kind}/rank"
        for rel in sorted(f for f in manifest["files"] if f.startswith(prefix) and f.endswith(".safetensors")):
            self._open(rel, format_1)

    def _open(self, rel: str, format_1: bool) -> None:
        header, data_start = read_header(self.directory / rel, self.manifest["files"][rel])
        metadata = header.get("__metadata__") or {}
        try:
            digests = json.loads(metadata.get(DIGEST, "{}"))
            table = _format_1_table(rel, header, self.manifest) if format_1 else \
                json.loads(metadata.get(METADATA_KEY, "{}"))
            for key, meta in table.items():
                fragment = Fragment(**dict(meta, shape=tuple(meta["shape"])))
                if format_1 and any(f.tp_rank == fragment.tp_rank for _, f in self.index[fragment.key]):
                    continue  # a replicated or tied tensor saved by several ranks: one copy is read
                begin, end = header[key]["data_offsets"]
                if header[key]["dtype"] != "F32" or end - begin != 4 * fragment.numel:
                    raise ValueError(f"{key}: {header[key]} does not hold {fragment.numel} fp32 elements")
                self.index[fragment.key].append((rel, fragment))
                self.where[(rel, fragment.key)] = (data_start + begin, digests.get(key))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{self.directory / rel}: unreadable fragment table ({error})") from None

    def _read(self, rel: str, fragment: Fragment, lo: int, hi: int, purpose: str = "load") -> torch.Tensor:
        """Elements lo..hi of one fragment, read from its file."""
        out = torch.empty(hi - lo, dtype=torch.float32)
        self.bytes_read[purpose] += 4 * (hi - lo)
        if rel not in self.handles:
            self.handles[rel] = os.open(self.directory / rel, os.O_RDONLY)
        view, at, got = memoryview(out.numpy()).cast("B"), self.where[(rel, fragment.key)][0] + 4 * lo, 0
        while got < len(view):
            n = os.preadv(self.handles[rel], [view[got:]], at + got)
            if not n:
                raise CheckpointError(f"{self.directory / rel}: {fragment.key} is cut short")
            got += n
        return out

    def close(self) -> None:
        for handle in self.handles.values():
            os.close(handle)
        self.handles.clear()

    __del__ = close

    def _verify(self, rel: str, fragment: Fragment, lo: int = 0, hi: Optional[int] = None) -> None:
        """Check elements lo..hi of one fragment: the digests of the chunks holding them (or,
        written without chunk digests, the whole file)."""
        digests = self.where[(rel, fragment.key)][1]
        if digests is None:
            if (rel, None) not in self.verified and not matches(self.directory / rel, self.manifest["files"][rel]):
                raise CheckpointError(f"{self.directory / rel}: size or checksum differs from the manifest (corrupt)")
            self.verified.add((rel, None))
            return
        per_chunk = CHUNK_BYTES // 4
        hi = fragment.numel if hi is None else hi
        for chunk in range(lo // per_chunk, -(-hi // per_chunk)):
            if (rel, fragment.key, chunk) in self.verified:
                continue
            data = self._read(rel, fragment, chunk * per_chunk, min(fragment.numel, (chunk + 1) * per_chunk), "verify")
            if chunk >= len(digests) or xxhash.xxh3_128(memoryview(data.numpy())).hexdigest() != digests[chunk]:
                raise CheckpointError(f"{self.directory / rel}: {fragment.key} differs from its checksum (corrupt)")
            self.verified.add((rel, fragment.key, chunk))

    def _overlapping(self, name: str, state: str, tp_rank: int, start: int, numel: int) -> list:
        first = self._fragments(name, state)[0][1]
        rank = 0 if first.tp_dim is None else tp_rank
        return [(rel, f) for rel, f in self._fragments(name, state)
                if f.tp_rank == rank and f.offset < start + numel and start < f.offset + f.numel]

    def flat_range(self, name: str, state: str, tp_rank: int, start: int, numel: int) -> torch.Tensor:
        """Elements start..start+numel of the flattened saved TP shard `tp_rank`, read from the
        fragments that overlap them only, sliced in the file."""
        out, at = torch.empty(numel, dtype=torch.float32), start
        for rel, f in sorted(self._overlapping(name, state, tp_rank, start, numel), key=lambda x: x[1].offset):
            lo, hi = max(start, f.offset), min(start + numel, f.offset + f.numel)
            if lo != at:  # the fragments must tile the range: each element saved once
                self._not_tiled(name, state, tp_rank, at)
            self._verify(rel, f, lo - f.offset, hi - f.offset)
            out[lo - start: hi - start] = self._read(rel, f, lo - f.offset, hi - f.offset)
            at = hi
        if at != start + numel:
            self._not_tiled(name, state, tp_rank, at)
        return out

    def _not_tiled(self, name: str, state: str, tp_rank: int, at: int):
        raise CheckpointError(f"{self.directory}: {name}/{state} shard {tp_rank}: element {at} missing or "
                              "saved twice")

    def verify_range(self, name: str, state: str, tp_rank: int, tp_size: int, start: int, numel: int) -> None:
        """Check the chunks read_range() would read for these arguments against their digests."""
        for saved_rank, span_start, span_numel, *_ in self._plan(name, state, tp_rank, tp_size, start, numel):
            for rel, f in self._overlapping(name, state, saved_rank, span_start, span_numel):
                self._verify(rel, f, max(span_start, f.offset) - f.offset,
                             min(span_start + span_numel, f.offset + f.numel) - f.offset)

    def read_range(self, name: str, state: str, tp_rank: int, tp_size: int, start: int, numel: int) -> torch.Tensor:
        """Elements start..start+numel of the flattened TP shard `tp_rank` of `tp_size` (this run's
        split, whatever split saved it): what a ZeRO partition, or (the whole range) a rank
        without ZeRO, needs. Only the saved fragments that overlap it are read, sliced in the
        file (row by row where the saved rows are wider than the ones needed)."""
        out = torch.empty(numel, dtype=torch.float32)
        for saved_rank, span_start, span_numel, rows, width, saved_row, at, row in \
                self._plan(name, state, tp_rank, tp_size, start, numel):
            target = out.as_strided((rows, width), (row, 1), at)
            if width < saved_row and rows > 1:  # the saved rows are wider: read the needed part of each
                for i in range(rows):
                    target[i] = self.flat_range(name, state, saved_rank, span_start + i * saved_row, width)
            else:
                span = self.flat_range(name, state, saved_rank, span_start, span_numel)
                target.copy_(span.as_strided((rows, width), (saved_row, 1)))
        return out

    def tp_shard(self, name: str, state: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The whole TP shard `tp_rank` of `tp_size` of one parameter's state."""
        shape = self._shard_shape(name, state, tp_size)
        return self.read_range(name, state, tp_rank, tp_size, 0, int(torch.Size(shape).numel())).view(shape)

    def _shard_shape(self, name: str, state: str, tp_size: int) -> tuple:
        return replace(self._fragments(name, state)[0][1], tp_size=tp_size).shard_shape()

    def _plan(self, name: str, state: str, tp_rank: int, tp_size: int, start: int, numel: int) -> list:
        """How to read a range of a TP shard at this run's split from the saved split: a list of
        (saved TP rank, start and numel of the span read from that saved shard, rows, width,
        the saved shard's row stride, where the rows go in the result, the result's row stride).

        View a full tensor of shape [outer..., B, inner...] split along B as rows: one row per
        outer index, B x inner elements wide; a TP shard is then a column block of every row, and
        the range a contiguous run of its rows (a partial first and last row). Where a saved
        shard's column block meets the range's columns, the span from the first to the last
        element needed is read and its rows copied. With the same split, one span: the range."""
        first = self._fragments(name, state)[0][1]
        if first.tp_dim is None or first.tp_size == tp_size:
            return [(0 if first.tp_dim is None else tp_rank, start, numel, 1, numel, numel, 0, numel)]
        dim, shape = first.tp_dim, first.shape
        inner = int(torch.Size(shape[dim + 1:]).numel())
        width, saved_width = shape[dim] // tp_size * inner, shape[dim] // first.tp_size * inner
        column0 = tp_rank * width  # where this shard's block starts in a full row
        plan = []
        for row0, row1, lo, hi in _row_segments(start, numel, width):
            for saved in range(first.tp_size):
                u, v = max(column0 + lo, saved * saved_width), min(column0 + hi, (saved + 1) * saved_width)
                if u < v:
                    rows = row1 - row0
                    plan.append((saved, row0 * saved_width + u - saved * saved_width,
                                 (rows - 1) * saved_width + v - u, rows, v - u, saved_width,
                                 row0 * width + u - column0 - start, width))
        return plan

    def full(self, name: str, state: str = MASTER) -> torch.Tensor:
        """The whole tensor (all TP shards put together)."""
        return self.tp_shard(name, state, 0, 1)

    def _fragments(self, name: str, state: str) -> list:
        fragments = self.index.get(f"{name}/{state}")
        if not fragments:
            raise CheckpointError(f"{self.directory}: no {state} of {name}")
        return fragments


def _format_1_table(rel: str, header: dict, manifest: dict) -> dict:
    """Format 1's whole TP shards (model/tp01-pp00.safetensors: "<name>" and "<name>/exp_avg"
    keys, shaped) described as fragments: each one is a whole shard, offset 0."""
    tp_rank, tp_size = int(Path(rel).stem.split("-")[0][2:]), manifest["saved_layout"]["tp"]
    table = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        name, _, state = key.partition("/")
        dim = split_of(name).dim
        shape = list(entry["shape"])
        if dim is not None:
            shape[dim] *= tp_size
        table[key] = {"name": name, "state": state or MASTER, "shape": shape, "tp_dim": dim,
                      "tp_rank": 0 if dim is None else tp_rank, "tp_size": 1 if dim is None else tp_size,
                      "offset": 0, "numel": int(torch.Size(entry["shape"]).numel())}
    return table


def _row_segments(start: int, numel: int, width: int) -> list:
    """Elements start..start+numel of a [rows, width] array as at most three blocks (a partial
    first row, the full rows, a partial last row): [(row0, row1, column lo, column hi)]."""
    end, segments = start + numel, []
    row, column = divmod(start, width)
    if column:
        segments.append((row, row + 1, column, min(width, column + numel)))
        row += 1
        if row * width >= end:
            return segments
    full = (end - row * width) // width
    if full:
        segments.append((row, row + full, 0, width))
        row += full
    if end > row * width:
        segments.append((row, row + 1, 0, end - row * width))
    return segments
