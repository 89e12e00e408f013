"""The format-2 reader on its own (no processes): real files written by write_fragments, read back
at another TP split and range, against slices of the full tensor taken here with torch.chunk.

- read_range: for 2-D and 3-D tensors split along dimension 0, 1 or 2 (and replicated), saved at
  TP 1, 2, 3 or 6 with each saved shard cut into fragments at random offsets (as ZeRO cuts them),
  random ranges of every shard at another TP split equal the reference slice;
- it reads exactly the elements it returns (bytes counted by the reader), also where the saved
  rows are wider than the ones needed (TP 1 -> 2 along dimension 1);
- verification is per 4 MiB chunk: a range inside one chunk verifies that chunk only; a flipped
  byte in another chunk does not stop it, and stops any read that needs that chunk; a changed
  header stops the reader at open;
- safetensors' own reader opens the streamed files; files of the earlier format-2 writer
  (safetensors' save_file, sha256 in the manifest, no chunk digests) still read, verified whole.
"""
import hashlib
import itertools
import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.checkpoint.file_image import CHUNK_BYTES
from training.checkpoint.files import CheckpointError
from training.checkpoint.fragments import METADATA_KEY, Fragment, FragmentReader, fragment_file, write_fragments


def _save(directory, full: torch.Tensor, dim, tp: int, cuts: int, rng: random.Random, writer=write_fragments):
    """Save `full` split `tp` ways along `dim`, each shard cut into fragments spread over files
    (one per fake rank, as DP ranks would); returns the manifest."""
    files, rank = {}, 0
    shards = full.chunk(tp, dim) if dim is not None else [full]
    for tp_rank, shard in enumerate(shards):
        flat = shard.contiguous().reshape(-1)
        points = sorted({0, flat.numel(), *(rng.randrange(flat.numel()) for _ in range(cuts))})
        for lo, hi in zip(points, points[1:]):
            fragment = Fragment("x", "master", tuple(full.shape), dim, tp_rank if dim is not None else 0,
                                tp if dim is not None else 1, lo, hi - lo)
            rel = fragment_file("model", rank)
            files[rel] = writer(directory / rel, [(fragment, flat[lo:hi])])
            rank += 1
    return {"files": files}


CASES = [((24, 6), 0, (1, 2, 3, 6)), ((8, 12), 1, (1, 2, 3, 6)), ((4, 6, 5), 1, (1, 2, 3, 6)),
         ((6, 4, 6), 2, (1, 2, 3, 6)), ((8, 6), None, (1,))]


@pytest.mark.parametrize("shape,dim,tps", CASES, ids=[f"{s}-dim{d}" for s, d, _ in CASES])
def test_any_range_of_any_split_equals_the_slice(tmp_path, shape, dim, tps):
    rng = random.Random(0)
    full = torch.randn(shape)
    for saved, wanted in itertools.product(tps, tps):
        directory = tmp_path / f"saved{saved}-{wanted}"
        reader = FragmentReader(directory, _save(directory, full, dim, saved, 3, rng), "model")
        for tp_rank in range(wanted):
            reference = (full.chunk(wanted, dim)[tp_rank] if dim is not None else full).contiguous().reshape(-1)
            for _ in range(20):
                start = rng.randrange(reference.numel() + 1)
                numel = rng.randrange(reference.numel() - start + 1)
                before = reader.bytes_read["load"]
                got = reader.read_range("x", "master", tp_rank, wanted, start, numel)
                assert torch.equal(got, reference[start:start + numel]), (saved, wanted, tp_rank, start, numel)
                assert reader.bytes_read["load"] - before == 4 * numel, "read more than the range"
            shard = reader.tp_shard("x", "master", tp_rank, wanted)
            assert torch.equal(shard, reference.view(shard.shape))
        reader.close()


def test_verification_is_per_chunk(tmp_path):
    per_chunk = CHUNK_BYTES // 4
    full = torch.randn(3 * per_chunk + 5)
    manifest = _save(tmp_path, full, 0, 1, 0, random.Random(0))
    path = tmp_path / fragment_file("model", 0)
    reader = FragmentReader(tmp_path, manifest, "model")
    reader.verify_range("x", "master", 0, 1, 10, 100)
    assert reader.bytes_read["verify"] == CHUNK_BYTES, "verified more than the one chunk the range is in"
    reader.close()

    data = bytearray(path.read_bytes())
    data[len(data) - 8] ^= 0xFF  # in the last chunk
    path.write_bytes(bytes(data))
    reader = FragmentReader(tmp_path, manifest, "model")
    reader.verify_range("x", "master", 0, 1, per_chunk + 1, per_chunk)  # chunks 1-2: untouched
    assert torch.equal(reader.read_range("x", "master", 0, 1, per_chunk + 1, per_chunk),
                       full[per_chunk + 1: 2 * per_chunk + 1])
    with pytest.raises(CheckpointError, match="differs from its checksum"):
        reader.verify_range("x", "master", 0, 1, 3 * per_chunk, 2)
    reader.close()

    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end - 3] = ord("1") if data[header_end - 3] != ord("1") else ord("2")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header or checksum"):
        FragmentReader(tmp_path, manifest, "model")


def test_streamed_files_open_in_safetensors(tmp_path):
    full = torch.randn(40, 6)
    manifest = _save(tmp_path, full, 0, 2, 2, random.Random(1))
    pieces = []
    for rel in manifest["files"]:
        with safe_open(str(tmp_path / rel), framework="pt") as f:
            (key,) = f.keys()
            meta = json.loads(f.metadata()[METADATA_KEY])[key]
            pieces.append((meta["tp_rank"], meta["offset"], f.get_tensor(key)))
    shards = [torch.cat([t for r, _, t in sorted(pieces, key=lambda p: p[1]) if r == k]) for k in range(2)]
    assert torch.equal(torch.cat(shards).view(40, 6), full)


def _old_writer(path, fragments):
    """The earlier format-2 writer: safetensors' save_file, sha256 of the file in the manifest."""
    meta = {f.key: {**f.__dict__, "shape": list(f.shape)} for f, _ in fragments}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f.key: t.contiguous() for f, t in fragments}, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_files_of_the_earlier_writer_still_read_verified_whole(tmp_path):
    full = torch.randn(16, 8)
    manifest = _save(tmp_path, full, 1, 2, 1, random.Random(2), writer=_old_writer)
    reader = FragmentReader(tmp_path, manifest, "model")
    assert torch.equal(reader.tp_shard("x", "master", 0, 1), full)
    reader.close()
    path = tmp_path / sorted(manifest["files"])[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        FragmentReader(tmp_path, manifest, "model")


def test_fragments_that_do_not_tile_the_shard_are_refused(tmp_path):
    """Every element saved exactly once: a fragment missing, or one saved twice, is one
    CheckpointError naming the element, never a silently uninitialised or doubled range."""
    full = torch.randn(12)
    manifest = _save(tmp_path, full, 0, 1, 2, random.Random(3))
    files = sorted(manifest["files"])
    for broken in ({k: v for k, v in manifest["files"].items() if k != files[1]},  # a gap
                   {**manifest["files"], "model/rank00099.safetensors": manifest["files"][files[0]]}):  # twice
        if len(broken) > len(manifest["files"]):
            (tmp_path / "model" / "rank00099.safetensors").write_bytes((tmp_path / files[0]).read_bytes())
        reader = FragmentReader(tmp_path, {"files": broken}, "model")
        with pytest.raises(CheckpointError, match="missing or saved twice"):
            reader.full("x")
        reader.close()
