"""Format 2: the bytes each rank writes and hashes are its own share, measured at DP 1, 2 and 4.

The demo model (TINY of tests/train_steps.py: hidden 128, 4 layers, 8192 vocabulary rows, fp32),
trained one step so Adam's moments exist, is saved at TP1 x PP1 x DP1, DP2 and DP4 with ZeRO-1 (one
launch each). From each checkpoint's manifest and files, read here without the product's reader:

- every DP rank wrote one model/ and one optim/ file, and its size is exactly the safetensors header
  plus 4 bytes per fragment element; its elements (and so its bytes) are the total over DP within
  a few elements (ZeRO-1 cuts the flat parameter groups evenly, padding the last partition);
- the fragments' elements, summed over ranks, are the model's parameter count exactly, counted
  from the model's shape by BLOOM's formula (not by the product), once per state (master, exp_avg,
  exp_avg_sq); so the total written is the same at DP 1, 2 and 4 (nothing written twice, nothing
  left out);
- the fragments, put back together by their offsets, are the weights the running engine holds
  (dumped by rank 0 after the save), so each slice's metadata names the slice it holds;
- every file in the manifest has the bytes and xxh3-128 digest of the file on disk (computed here
  with xxhash over the file's bytes), and each safetensors file opens with safetensors' own reader
  (the product writes the format itself, from the tensors' memory).

Measured (file bytes per rank, model/ | optim/): DP1 7,385,464 | 14,771,736; DP2 3,690,272 and
3,695,480 | 7,380,816 and 7,391,456; DP4 1,845,320 .. 1,847,872 | 3,690,696 .. 3,695,984. The
payload is exactly 4 x 1,842,176 / DP (and twice that for optim/) on every rank; the rest is each
file's header (3-23 KB: the fragment table grows with the number of keys a rank holds). About 5 s
per launch on 2 cores.
"""
import json
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from parallelism.topology import Layout
from tests.multiprocess import run_processes
from tests.train_steps import make_engine, train
from training.checkpoint.checkpointer import Checkpointer
from training.trainer import LoopState

STEPS = 1
HIDDEN, LAYERS, VOCAB = 128, 4, 8192  # bloom-tiny as shipped (TINY pins no other shape)
# BLOOM: embedding V*h + its layernorm 2h; per block two layernorms 2h each, fused QKV 3h*h + 3h,
# attention dense h*h + h, MLP h->4h 4h*h + 4h and 4h->h 4h*h + h; final layernorm 2h.
PARAMETER_COUNT = VOCAB * HIDDEN + 2 * HIDDEN + LAYERS * (12 * HIDDEN ** 2 + 13 * HIDDEN) + 2 * HIDDEN
STATES = {"model": ("master",), "optim": ("exp_avg", "exp_avg_sq")}
# ZeRO-1 pads each flat group so DP divides it; the padding is not saved, so a rank may hold a few
# elements fewer than total/DP (per parameter group). Far below one row of any weight.
SLACK_ELEMENTS = 64


def _save(rank, layout, run_dir):
    cfg, engine = make_engine(["parallel.zero_stage=1", f"trainer.run_dir={run_dir}"], layout)
    train(cfg, engine, layout, 0, STEPS)
    gbs = cfg.trainer.global_batch_size
    Checkpointer(cfg, layout, engine).save(LoopState(STEPS, STEPS * gbs, STEPS * gbs * 32))
    if dist.get_rank() == 0:
        # TP1 x PP1, fp32 weights: each module parameter is whole and equals its fp32 master.
        weights = {name: p.detach().clone().contiguous() for name, p in engine.module.named_parameters()}
        assert sum(w.numel() for w in weights.values()) == PARAMETER_COUNT
        save_file(weights, str(Path(run_dir) / "engine_weights.safetensors"))


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _fragments(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["fragments"])


DPS = (1, 2, 4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """{dp: (checkpoint dir, manifest, run dir)}: the same model saved at DP 1, 2 and 4."""
    saved = {}
    for dp in DPS:
        run_dir = tmp_path_factory.mktemp(f"dp{dp}")
        run_processes(_save, Layout(1, 1, dp), Layout(1, 1, dp), str(run_dir))
        checkpoint = run_dir / "checkpoints" / f"iter_{STEPS:08d}"
        saved[dp] = checkpoint, json.loads((checkpoint / "manifest.json").read_text()), run_dir
    return saved


def _measure(checkpoint: Path, manifest: dict, dp: int) -> dict:
    """{kind: [(file bytes, header bytes, elements) per rank]}, checking each file's layout."""
    measured = {}
    for kind, states in STATES.items():
        rows = []
        assert sorted(f for f in manifest["files"] if f.startswith(f"{kind}/rank")) == \
            [f"{kind}/rank{r:05d}.safetensors" for r in range(dp)], f"{kind}: not one file per DP rank"
        for r in range(dp):
            path = checkpoint / f"{kind}/rank{r:05d}.safetensors"
            fragments = _fragments(path)
            assert {m["state"] for m in fragments.values()} == set(states)
            tensors = load_file(str(path))
            assert set(tensors) == set(fragments)
            for key, meta in fragments.items():
                assert tensors[key].dtype == torch.float32 and tensors[key].numel() == meta["numel"], key
            elements = sum(m["numel"] for m in fragments.values())
            size, header = path.stat().st_size, _header_bytes(path)
            assert size == header + 4 * elements, f"{path}: {size} bytes for {elements} fp32 elements"
            rows.append((size, header, elements))
        measured[kind] = rows
    return measured


@pytest.mark.parametrize("dp", DPS)
def test_each_rank_writes_its_share(checkpoints, dp):
    checkpoint, manifest, _ = checkpoints[dp]
    measured = _measure(checkpoint, manifest, dp)
    print(f"\nDP{dp} bytes per rank: " + "; ".join(
        f"{kind} {[size for size, _, _ in rows]} (headers {[h for _, h, _ in rows]})"
        for kind, rows in measured.items()))
    for kind, rows in measured.items():
        total_elements = PARAMETER_COUNT * len(STATES[kind])
        # Nothing duplicated, nothing left out: the same total at every DP.
        assert sum(e for _, _, e in rows) == total_elements, f"{kind}: {[e for _, _, e in rows]}"
        for rank, (size, header, elements) in enumerate(rows):
            share = total_elements / dp
            assert abs(elements - share) <= SLACK_ELEMENTS * len(STATES[kind]), \
                f"{kind} rank {rank}: {elements} elements, its share is {share}"
            # In bytes: 4 per element plus its own header (the fragment table; ~100 B per key).
            assert abs(size - 4 * share) <= header + 4 * SLACK_ELEMENTS * len(STATES[kind]), \
                f"{kind} rank {rank}: {size} bytes vs 4 x {share} + header {header}"


@pytest.mark.parametrize("dp", DPS)
def test_fragments_cover_each_parameter_once_and_hold_the_engine_weights(checkpoints, dp):
    checkpoint, _, run_dir = checkpoints[dp]
    weights = load_file(str(run_dir / "engine_weights.safetensors"))
    for kind, states in STATES.items():
        pieces = {}
        for r in range(dp):
            path = checkpoint / f"{kind}/rank{r:05d}.safetensors"
            tensors = load_file(str(path))
            for key, meta in _fragments(path).items():
                assert meta["tp_size"] == 1 and meta["tp_rank"] == 0
                pieces.setdefault(key, []).append((meta["offset"], tensors[key], tuple(meta["shape"])))
        assert set(pieces) == {f"{name}/{state}" for name in weights for state in states}
        for key, parts in pieces.items():
            name = key.rsplit("/", 1)[0]
            parts.sort(key=lambda x: x[0])
            at = 0
            for offset, tensor, shape in parts:
                assert offset == at, f"{key}: gap or overlap at {at} (fragment at {offset})"
                assert shape == tuple(weights[name].shape)
                at += tensor.numel()
            assert at == weights[name].numel(), f"{key}: {at} of {weights[name].numel()} elements"
            if kind == "model":
                full = torch.cat([t for _, t, _ in parts]).view(weights[name].shape)
                assert torch.equal(full, weights[name]), f"{key}: fragments differ from the engine's weights"


@pytest.mark.parametrize("dp", DPS)
def test_manifest_hashes_match_every_file(checkpoints, dp):
    checkpoint, manifest, _ = checkpoints[dp]
    ranks_written = [f for f in manifest["files"] if f.startswith(("model/rank", "optim/rank", "rng/rank"))]
    assert len(ranks_written) == 3 * dp
    on_disk = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    for rel, entry in manifest["files"].items():
        data = (checkpoint / rel).read_bytes()
        assert entry["bytes"] == len(data), rel
        assert entry["xxh3_128"] == xxhash.xxh3_128(data).hexdigest(), rel
        if rel.endswith(".safetensors"):
            with safe_open(str(checkpoint / rel), framework="pt") as f:
                assert sum(f.get_tensor(k).numel() for k in f.keys()) * 4 + _header_bytes(checkpoint / rel) == len(data)


def test_total_is_the_same_at_every_dp(checkpoints):
    """The same payload (file bytes less headers) per kind at DP 1, 2 and 4: 4 bytes per parameter
    per state, nothing written twice."""
    payloads = {}
    for dp, (checkpoint, manifest, _) in checkpoints.items():
        measured = _measure(checkpoint, manifest, dp)
        payloads[dp] = {kind: sum(s - h for s, h, _ in rows) for kind, rows in measured.items()}
    for kind in STATES:
        by_dp = {dp: payloads[dp][kind] for dp in DPS}
        assert set(by_dp.values()) == {4 * PARAMETER_COUNT * len(STATES[kind])}, f"{kind} payload bytes by DP: {by_dp}"
