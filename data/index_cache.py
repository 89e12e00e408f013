"""megatron-core's index caches (document, sample, shuffle and blending indices), built once.

megatron-core itself writes them from global rank 0 only (gpt_dataset.py, blended_dataset.py:
`torch.distributed.get_rank() == 0`), file by file into `path_to_cache`, and lets the other
ranks `numpy.load` them after a barrier. Across nodes that is where Megatron users' "*_doc_idx.npy
not found" comes from: a cache path that is not shared, a file another node does not see yet, or a
second job reading a half-written cache. Here:

- global rank 0 alone builds (never each node's local rank 0), into a staging directory named by
  its host, pid and a random tag (unique across nodes and jobs on one shared filesystem);
- the staging directory becomes `indices/<key>` by one rename: a directory that exists is
  complete; a killed build's staging directory is never read, and removed by a later build
  (this host's when its process is gone, any host's after a day untouched). A second job that loses the race to publish the same key drops its own copy (the key
  hashes everything that determines the indices, so the two are identical);
- every other rank reads only after rank 0 published, and waits a little for the directory to
  appear on its node (NFS attribute caches) before calling the path not shared;
- rank 0 keeps the datasets it just built instead of reading them back (megatron-core's own
  builder does the same), the other ranks read them, one pass each, with megatron-core's
  deferred loading (a prefix's indices are mapped when it is first sampled).
"""
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import torch.distributed as dist

from data.distributed import all_ranks_agree, on_rank0_then_all, rank
from data.errors import DataError
from data.indexed_writer import _alive  # the same pid check as for .bin/.idx temporaries

VISIBLE_WAIT_S = 30.0  # how long a rank waits to see rank 0's cache before calling it not shared
STALE_AFTER_S = 24 * 3600.0  # another host's staging directory untouched this long died with its job


@dataclass
class CacheUse:
    """What this rank did with the index caches of one build_datasets call."""

    root: Path
    built: list = field(default_factory=list)  # keys built by this rank
    read: list = field(default_factory=list)  # keys read from the cache by this rank


def build_cached(cls, config, sizes: list, identity: dict, use: CacheUse) -> list:
    """megatron-core's BlendedMegatronDatasetBuilder(cls, sizes, ..., config).build(), its
    indices cached under use.root/indices/<key>; call on every rank."""
    key = cache_key(config, sizes, identity)
    final = use.root / "indices" / key
    if on_rank0_then_all(final.is_dir):
        return _read(cls, config, sizes, final, use, key, lambda: True)
    staging = final.with_name(f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if rank() == 0:
        remove_stale_staging(final.parent)
    config.path_to_cache = str(staging)
    built = _megatron_build(cls, config, sizes, lambda: rank() == 0)  # the others join its barriers
    on_rank0_then_all(lambda: publish(staging, final))
    if rank() == 0:
        use.built.append(key)
    # Rank 0 only takes part in the other ranks' barriers: it holds what it built.
    others = _read(cls, config, sizes, final, use, key, lambda: rank() != 0)
    return built if rank() == 0 else others


def _read(cls, config, sizes: list, final: Path, use: CacheUse, key: str, built_here) -> list:
    wait_visible(final)
    config.path_to_cache = str(final)
    if dist.get_world_size() == 1 and not built_here():
        return [None] * len(sizes)
    if not built_here():
        return _megatron_build(cls, config, sizes, built_here)
    use.read.append(key)
    # megatron-core's deferred loading: each of the blend's datasets opens its three index files
    # when first sampled, not all of them now (3 memory maps, 3 descriptors per prefix and split).
    config.defer_npy_index_mmap = True
    return [_load_top_level(dataset) for dataset in _megatron_build(cls, config, sizes, built_here)]


def _load_top_level(dataset):
    """The split's own indices read now, as without deferral (callers look at them directly)."""
    if dataset is None:
        return None
    if hasattr(dataset, "path_to_dataset_index"):  # a BlendedDataset
        dataset.dataset_index = numpy.load(dataset.path_to_dataset_index, allow_pickle=True, mmap_mode="r")
        dataset.dataset_sample_index = numpy.load(dataset.path_to_dataset_sample_index, allow_pickle=True,
                                                  mmap_mode="r")
    else:  # a one-prefix split: a GPTDataset
        dataset.shuffle_index = numpy.load(dataset.path_to_shuffle_index, allow_pickle=True, mmap_mode="r")
        dataset.sample_index = numpy.load(dataset.path_to_sample_index, allow_pickle=True, mmap_mode="r")
        dataset.document_index = numpy.load(dataset.path_to_document_index, allow_pickle=True, mmap_mode="r")
    return dataset


def _megatron_build(cls, config, sizes: list, built_here) -> list:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    return BlendedMegatronDatasetBuilder(cls, sizes, built_here, config).build()


def publish(staging: Path, final: Path) -> None:
    """Make `staging` visible as `final` in one rename; if another job published the same key
    first (before the check or between it and the rename), keep theirs, drop ours."""
    if not final.exists():
        try:
            os.rename(staging, final)
            return
        except OSError:  # ENOTEMPTY / EEXIST: someone renamed onto `final` just before us
            if not final.is_dir():
                raise
    shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(indices: Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete staging directories of builds that died: this host's whose process is gone, and any
    host's untouched for `max_age_s` (a live build adds files every few seconds)."""
    removed = []
    for directory in indices.glob(".*.tmp-*"):
        host_pid = directory.name.split(".tmp-", 1)[1].rpartition("-")[0]  # <host>-<pid>-<tag>
        host, _, pid = host_pid.rpartition("-")
        dead_here = host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))
        try:
            old = time.time() - directory.stat().st_mtime > max_age_s
        except FileNotFoundError:  # published or dropped meanwhile
            continue
        if dead_here or old:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def wait_visible(path: Path, seconds: float = VISIBLE_WAIT_S) -> None:
    """Every rank sees `path` (made by rank 0), each waiting up to `seconds` for it; else one
    line saying the cache is not on a shared filesystem."""
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not all_ranks_agree(path.exists()):
        raise DataError(f"rank {rank()}: {path} made by rank 0 is not visible on every rank; "
                        "data.cache_dir must be on a filesystem shared by all nodes")


def cache_key(config, sizes: list, identity: dict) -> str:
    """A hash of everything that determines the indices: the files (path, sizes, mtime), the
    sizes asked for, seed, sequence length, split, tokenizer, weights and `identity`."""
    files = []
    for prefix in config.blend[0]:
        stat = os.stat(f"{prefix}.idx")
        files.append([prefix, stat.st_size, stat.st_mtime_ns, os.stat(f"{prefix}.bin").st_size])
    payload = {"files": files, "sizes": sizes, "seed": config.random_seed, "seq": config.sequence_length,
               "split_matrix": config.split_matrix, "tokenizer": config.tokenizer.fingerprint,
               "eod_mask_loss": config.eod_mask_loss, "weights": config.blend[1], **identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
