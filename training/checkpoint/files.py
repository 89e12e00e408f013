"""The checkpoint format on disk: layout-independent ("universal"), safetensors, checksummed.

    <checkpoints>/iter_00000100/
        manifest.json                  format, iteration, model shape, saved layout, and the bytes +
                                       xxh3-128 digest of every other file (written last: no
                                       manifest, no checkpoint)
        model/rank00003.safetensors    format 2: the fragments of the fp32 master weights rank 3
                                       held (its ZeRO partition of its TP shard), each 1-D, with
                                       what slice of which full tensor it is in the file's metadata
                                       (training/checkpoint/fragments.py)
        optim/rank00003.safetensors    "<name>/exp_avg", "<name>/exp_avg_sq" fragments, the same way
        optim/meta.json                Adam step count and the loss-scaler state
        trainer_state.json             iteration, consumed samples and tokens
        rng/rank00000.pt               each rank's RNG states (tensors and ints only)
        config.yaml, tokenizer/        the resolved config and the tokenizer
    <checkpoints>/latest               the name of the newest complete checkpoint

Format 1 (what bloom-train and bloom-import wrote before format 2) stores whole TP shards instead,
model/tp00-pp00.safetensors and optim/tp00-pp00.safetensors, under canonical names
(training/model/param_table.py); nothing writes it any more, the same reader loads both
(fragments.py describes each of its shards as one fragment).
Both formats load at any layout. Nothing here unpickles anything that is not checked first:
safetensors for tensors, JSON for the rest, RNG files loaded with weights_only=True after their
checksum matched.

Checksums are xxh3-128 (xxhash): they are there to catch torn writes, truncation and bit rot, not
tampering, and at ~27 GB/s per core (sha256: ~1.9 GB/s here) hashing a rank's tens of GB no longer
costs more than writing them. Manifests written before this carry sha256 entries; both verify.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import xxhash

from training.checkpoint.file_image import DIGEST, HEADER_DIGEST
from training.model.param_table import PARAMETERS, Split

FORMAT_1 = "bloom-pretrain-checkpoint/1"  # whole TP shards gathered over DP (read, no longer written)
FORMAT = "bloom-pretrain-checkpoint/2"  # per-rank fragments: training/checkpoint/fragments.py
FORMATS = (FORMAT_1, FORMAT)
MANIFEST = "manifest.json"
LATEST = "latest"
SPLITS = {spec.name.format(i="*"): spec.split for spec in PARAMETERS}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def iteration_dir(checkpoints: Path, iteration: int) -> Path:
    return Path(checkpoints) / f"iter_{iteration:08d}"


def split_of(name: str) -> Split:
    """The TP split of a canonical parameter name ("h.3.mlp..." -> the "h.*.mlp..." entry)."""
    parts = name.split(".")
    key = ".".join("*" if (i == 1 and parts[0] == "h") else p for i, p in enumerate(parts))
    if key not in SPLITS:
        raise CheckpointError(f"{name} is not a BLOOM parameter")
    return SPLITS[key]


# -- writing ---------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


_BLOCK = 1 << 24


def digest_file(path: Path) -> dict:
    """The manifest entry of a file on disk: {"bytes", "xxh3_128"}."""
    return {"bytes": Path(path).stat().st_size, DIGEST: _hash_file(path, xxhash.xxh3_128())}


def matches(path: Path, expected: dict) -> bool:
    """Whether a file has the size and digest of its manifest entry (xxh3-128, or the sha256 of
    manifests written before xxh3)."""
    if path.stat().st_size != expected["bytes"]:
        return False
    if DIGEST in expected:
        return _hash_file(path, xxhash.xxh3_128()) == expected[DIGEST]
    return _hash_file(path, hashlib.sha256()) == expected.get("sha256")


def _hash_file(path: Path, digest) -> str:
    with open(path, "rb", buffering=0) as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_header(path: Path, expected: dict) -> tuple:
    """(header dict, where the data starts) of a safetensors file, after checking the header
    against its manifest entry's header digest (entries without one: the whole file)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length > min(expected["bytes"], 1 << 30):
                raise ValueError(f"header length {length}")
            head = length.to_bytes(8, "little") + f.read(length)
        ok = xxhash.xxh3_128(head).hexdigest() == expected[HEADER_DIGEST] if HEADER_DIGEST in expected else matches(path, expected)
        if not ok:
            raise CheckpointError(f"{path}: header or checksum differs from the manifest (corrupt)")
        return json.loads(head[8:]), 8 + length
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None


def _fsync_dirs(root: Path) -> None:
    """Directory entries (the files' names) are durable too, not only their bytes."""
    for path in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def finalize(staging: Path, final: Path, manifest: dict, hashed: Optional[dict] = None,
             format: str = FORMAT) -> None:
    """Checksum the files not already `hashed` (by the ranks that wrote them: {path: {bytes,
    xxh3_128}}), write the manifest, then make the checkpoint visible with one rename and point
    `latest` at it (itself replaced by a rename): a crash at any point leaves either the
    previous state or the new complete one."""
    hashed = dict(hashed or {})
    own = [p for p in sorted(staging.rglob("*")) if p.is_file() and str(p.relative_to(staging)) not in hashed]
    files = {**hashed, **{str(p.relative_to(staging)): digest_file(p) for p in own}}
    write_json(staging / MANIFEST, {**manifest, "format": format, "files": dict(sorted(files.items()))})
    for path in own + [staging / MANIFEST]:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dirs(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    latest_tmp = final.parent / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, final.parent / LATEST)


def staging_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


# -- reading ---------------------------------------------------------------------------------

def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}: not a complete checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable manifest ({error})") from None
    if manifest.get("format") not in FORMATS:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected one of {', '.join(FORMATS)}")
    return manifest


def verify(directory: Path, files: Optional[Iterable[str]] = None) -> dict:
    """The manifest, after checking the size and digest of the listed files (all by default)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name in files if files is not None else manifest["files"]:
        expected = manifest["files"].get(name)
        path = directory / name
        if expected is None or not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        if not matches(path, expected):
            raise CheckpointError(f"{path}: size or checksum differs from the manifest (corrupt)")
    return manifest


def resolve_latest(checkpoints: Path) -> Optional[Path]:
    pointer = Path(checkpoints) / LATEST
    if not pointer.is_file():
        return None
    return Path(checkpoints) / pointer.read_text().strip()


def complete_checkpoints(checkpoints: Path) -> list:
    """Complete checkpoint directories, oldest first (partial ones are hidden dot-directories)."""
    root = Path(checkpoints)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("iter_*") if (p / MANIFEST).is_file())
