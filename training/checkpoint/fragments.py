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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open

from training.checkpoint.files import CheckpointError, sha256, write_tensors

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


def write_fragments(path: Path, fragments: List[tuple]) -> dict:
    """Write [(Fragment, 1-D tensor)] to one safetensors file, fsync it, and return its
    {"bytes", "sha256"} entry for the manifest (each rank hashes only what it wrote)."""
    tensors = {f.key: t.detach().reshape(-1).float().cpu() for f, t in fragments}
    meta = {f.key: {**f.__dict__, "shape": list(f.shape)} for f, _ in fragments}
    write_tensors(path, tensors, metadata={METADATA_KEY: json.dumps(meta)})
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


class FragmentReader:
    """Reads full tensors or TP shards of a format-2 checkpoint, one tensor at a time, opening only
    the files that hold a needed fragment and checking each file's checksum before its first use."""

    def __init__(self, directory: Path, manifest: dict, kind: str):
        self.directory, self.manifest = Path(directory), manifest
        self.index: Dict[str, List[tuple]] = defaultdict(list)  # key -> [(file, Fragment)]
        self.verified = set()
        for rel in sorted(f for f in manifest["files"] if f.startswith(f"{kind}/rank")):
            for key, meta in self._metadata(rel).items():
                meta = dict(meta, shape=tuple(meta["shape"]))
                self.index[key].append((rel, Fragment(**meta)))

    def _metadata(self, rel: str) -> dict:
        try:
            with safe_open(str(self.directory / rel), framework="pt") as f:
                return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{self.directory / rel}: unreadable fragment file ({error})") from None

    def _verify(self, rel: str) -> None:
        if rel in self.verified:
            return
        expected, path = self.manifest["files"][rel], self.directory / rel
        if path.stat().st_size != expected["bytes"] or sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: size or checksum differs from the manifest (corrupt)")
        self.verified.add(rel)

    def verify_shard(self, name: str, state: str, tp_rank: int, tp_size: int) -> None:
        """Check the checksums of the files tp_shard() would read for these arguments."""
        fragments = self._fragments(name, state)
        first = fragments[0][1]
        same_split = first.tp_dim is None or first.tp_size == tp_size
        for rel, fragment in fragments:
            if not same_split or first.tp_dim is None or fragment.tp_rank == tp_rank:
                self._verify(rel)

    def same_split(self, name: str, tp_size: int) -> bool:
        """Whether the checkpoint holds `name` split as a run at `tp_size` splits it."""
        first = self._fragments(name, MASTER)[0][1]
        return first.tp_dim is None or first.tp_size == tp_size

    def _overlapping(self, name: str, state: str, tp_rank: int, start: int, numel: int) -> list:
        first = self._fragments(name, state)[0][1]
        rank = 0 if first.tp_dim is None else tp_rank
        return [(rel, f) for rel, f in self._fragments(name, state)
                if f.tp_rank == rank and f.offset < start + numel and start < f.offset + f.numel]

    def verify_range(self, name: str, state: str, tp_rank: int, start: int, numel: int) -> None:
        for rel, _ in self._overlapping(name, state, tp_rank, start, numel):
            self._verify(rel)

    def flat_range(self, name: str, state: str, tp_rank: int, start: int, numel: int) -> torch.Tensor:
        """Elements start..start+numel of the flattened TP shard `tp_rank` (saved at the TP size
        the caller runs at), read from the fragments that overlap them only, sliced in the file:
        what one ZeRO partition needs, whatever DP size and stage saved it."""
        out = torch.empty(numel, dtype=torch.float32)
        covered = 0
        for rel, f in self._overlapping(name, state, tp_rank, start, numel):
            lo, hi = max(start, f.offset), min(start + numel, f.offset + f.numel)
            self._verify(rel)
            with safe_open(str(self.directory / rel), framework="pt") as handle:
                out[lo - start: hi - start] = handle.get_slice(f.key)[lo - f.offset: hi - f.offset]
            covered += hi - lo
        if covered != numel:
            raise CheckpointError(f"{self.directory}: {name}/{state} elements {start}..{start + numel} of "
                                  f"shard {tp_rank}: {covered} saved")
        return out

    def tp_shard(self, name: str, state: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The TP shard `tp_rank` of `tp_size` of one parameter's state. When the checkpoint was
        saved at this TP size only that shard's fragments are read; otherwise the whole tensor
        is assembled (one tensor beyond the rank's own state) and cut."""
        fragments = self._fragments(name, state)
        _, first = fragments[0]
        if first.tp_dim is None:
            return self._assemble(name, state, fragments, 0, 1)
        if first.tp_size == tp_size:
            return self._assemble(name, state, [x for x in fragments if x[1].tp_rank == tp_rank], tp_rank, tp_size)
        full = self.full(name, state)
        return full.chunk(tp_size, dim=first.tp_dim)[tp_rank].contiguous()

    def full(self, name: str, state: str = MASTER) -> torch.Tensor:
        fragments = self._fragments(name, state)
        _, first = fragments[0]
        if first.tp_dim is None:
            return self._assemble(name, state, fragments, 0, 1)
        shards = [self._assemble(name, state, [x for x in fragments if x[1].tp_rank == r], r, first.tp_size)
                  for r in range(first.tp_size)]
        return torch.cat(shards, dim=first.tp_dim)

    def _fragments(self, name: str, state: str) -> list:
        fragments = self.index.get(f"{name}/{state}")
        if not fragments:
            raise CheckpointError(f"{self.directory}: no {state} of {name}")
        return fragments

    def _assemble(self, name: str, state: str, fragments: list, tp_rank: int, tp_size: int) -> torch.Tensor:
        """One TP shard from its fragments, checking that they cover it exactly once."""
        if not fragments:
            raise CheckpointError(f"{self.directory}: no fragment of TP shard {tp_rank}/{tp_size} of {name}/{state}")
        shape = fragments[0][1].shard_shape()
        flat = torch.empty(int(torch.Size(shape).numel()), dtype=torch.float32)
        covered = 0
        for rel, fragment in sorted(fragments, key=lambda x: x[1].offset):
            if fragment.offset != covered:
                raise CheckpointError(f"{self.directory}: {name}/{state} shard {tp_rank}: elements "
                                      f"{covered}..{fragment.offset} missing or written twice")
            self._verify(rel)
            with safe_open(str(self.directory / rel), framework="pt") as f:
                flat[fragment.offset: fragment.offset + fragment.numel] = f.get_tensor(fragment.key)
            covered += fragment.numel
        if covered != flat.numel():
            raise CheckpointError(f"{self.directory}: {name}/{state} shard {tp_rank}: {covered} of "
                                  f"{flat.numel()} elements saved")
        return flat.view(shape)
