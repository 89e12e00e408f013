"""Index caches of a sharded blend: built once by global rank 0 into one shared directory, read by
every other rank whatever node it is on; two jobs sharing the directory never race; one
validation set per language, not per shard.

The sharded blend: four of the shipped corpus's languages, each cut into three .bin/.idx shards
named <language>_<shard> (as a sharded corpus arrives).
"""
import contextlib
import hashlib
import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from data.config import DataConfig, DatasetSpec, TokenizerConfig
from data.index_file import document_lengths
from data.indexed_writer import IndexedWriter
from data.summary import read_summary
from data.valid_sets import language_of
from parallelism.layout import Layout
from tests.multiprocess import run_processes
from tests.test_data_helpers import process_group, processed_dir, tokenizer_dir  # noqa: F401

LANGUAGES = ("en", "fr", "hi", "python")
SHARDS = 3


@pytest.fixture(scope="module")
def shards(processed_dir, tmp_path_factory) -> list[dict]:
    """[{name, prefix}] of the sharded blend: each language's documents cut into SHARDS prefixes."""
    out = tmp_path_factory.mktemp("shards")
    dtype = read_summary(processed_dir)["dtype"]
    blend = []
    for language in LANGUAGES:
        prefix = processed_dir / language
        lengths = document_lengths(prefix)
        tokens = np.fromfile(f"{prefix}.bin", dtype=dtype)
        docs = np.split(tokens, np.cumsum(lengths)[:-1])
        for k, part in enumerate(np.array_split(np.arange(len(docs)), SHARDS)):
            writer = IndexedWriter(out / f"{language}_{k:04d}", dtype)
            writer.add_documents(np.concatenate([docs[i] for i in part]), lengths[part])
            writer.finalize()
            blend.append({"name": f"{language}_{k:04d}", "prefix": str(out / f"{language}_{k:04d}")})
    return blend


def sharded_config(tokenizer_dir, cache, blend, **overrides) -> DataConfig:
    cfg = DataConfig(seq_length=64, corpus=[], cache_dir=str(cache), split="80,10,10",
                     tokenizer=TokenizerConfig(path=str(tokenizer_dir)),
                     blend=[DatasetSpec(b["name"], b["prefix"]) for b in blend])
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def digest(splits) -> str:
    """Every sample of train and valid (their order and tokens) and of each language's set."""
    h = hashlib.sha256()
    for dataset in (splits.train, splits.valid, *[splits.valid_per_dataset[k] for k in sorted(splits.valid_per_dataset)]):
        h.update(np.asarray(getattr(dataset, "dataset_index", [])).tobytes())
        for i in range(len(dataset)):
            h.update(dataset[i]["tokens"].numpy().tobytes())
    return h.hexdigest()


# ---- several ranks, each the local rank 0 of its own node, one empty shared cache ------------

def _rank_on_its_own_node(rank: int, tokenizer: str, cache: str, blend: list, out: str) -> None:
    """Build the sharded blend as rank `rank` of a job whose every rank says it is the first
    process of its own node (LOCAL_RANK=0, hostname node<rank>); record what it wrote."""
    import numpy

    from data.datasets import build_datasets

    os.environ["LOCAL_RANK"] = "0"
    socket.gethostname = lambda: f"node{rank}"
    saved, save = [], numpy.save
    numpy.save = lambda path, *args, **kwargs: (saved.append(str(path)), save(path, *args, **kwargs))[1]
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        splits = build_datasets(sharded_config(tokenizer, cache, blend), 400, 40, 0)
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"digest": digest(splits), "saved": saved, "said": said.getvalue(),
         "languages": sorted(splits.valid_per_dataset)}))


def test_ranks_on_different_nodes_build_one_cache_once_and_read_the_same(tokenizer_dir, shards, tmp_path):
    """Three ranks on three 'nodes' (each its node's local rank 0) from one empty cache: every
    index file is written once, by global rank 0 alone; every rank gets the same samples; the
    cache holds only published directories (no staging left); the job says so in one line."""
    cache = tmp_path / "shared_cache"
    run_processes(_rank_on_its_own_node, Layout(1, 1, 3), str(tokenizer_dir), str(cache), shards, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert ranks[1]["saved"] == ranks[2]["saved"] == []
    saved = ranks[0]["saved"]
    assert saved and len(saved) == len(set(saved))
    assert len({r["digest"] for r in ranks}) == 1
    assert ranks[0]["languages"] == sorted(LANGUAGES)
    published = sorted(p.name for p in (cache / "indices").iterdir())
    assert published and not any(name.startswith(".") for name in published)
    # Each file rank 0 wrote (into its staging directory) is in a published one now.
    assert {Path(p).parent.name.split(".tmp-")[0].lstrip(".") for p in saved} == set(published)
    assert f"data: index caches in {cache / 'indices'}: {len(published)} built (rank 0 on node0), " \
           f"read by 2 rank(s) on 2 host(s) (node1, node2)" in ranks[0]["said"]


# ---- two jobs on one shared cache --------------------------------------------------------------

def _one_job(index: int, tokenizer: str, cache: str, blend: list, out: str) -> None:
    """A single-process job of its own (build_datasets makes its world-size-1 group)."""
    from data.datasets import build_datasets

    splits = build_datasets(sharded_config(tokenizer, cache, blend), 400, 40, 0)
    Path(out, f"job{index}.json").write_text(json.dumps({"digest": digest(splits)}))


def test_two_jobs_starting_together_on_one_cache_both_train_on_the_same_indices(tokenizer_dir, shards, tmp_path):
    """Two jobs start at once on one empty cache directory: both build (neither waits), one
    publishes each key, the other drops its copy; both end with identical datasets and the cache
    with no staging directory left."""
    cache = tmp_path / "shared_cache"
    mp.start_processes(_one_job, args=(str(tokenizer_dir), str(cache), shards, str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    jobs = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(2)]
    assert jobs[0]["digest"] == jobs[1]["digest"]
    assert not any(p.name.startswith(".") for p in (cache / "indices").iterdir())


def test_losing_the_race_to_publish_keeps_the_winners_cache(tmp_path):
    """Another job renamed its copy onto the key between our check and our rename: ours is
    dropped, theirs stays, no error."""
    from data.index_cache import publish

    final, ours = tmp_path / "key", tmp_path / ".key.tmp-a"
    for directory, text in ((final, "theirs"), (ours, "ours")):
        directory.mkdir()
        (directory / "x.npy").write_text(text)
    publish(ours, final)
    assert (final / "x.npy").read_text() == "theirs" and not ours.exists()
    ours.mkdir()
    (ours / "x.npy").write_text("ours")
    publish(ours, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "x.npy").read_text() == "ours" and not ours.exists()


# ---- one process --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,language", [("en_0003", "en"), ("zh-00001-of-00040", "zh"), ("en", "en"),
                                           ("python", "python"), ("fr.shard7", "fr"), ("1b7", "1b7")])
def test_language_is_the_name_without_a_shard_number(name, language):
    assert language_of(name) == language


@pytest.mark.usefixtures("process_group")
def test_one_validation_set_per_language_from_its_shards_valid_documents(tokenizer_dir, shards, tmp_path):
    """Each language's validation set holds its shards' valid documents (one epoch of each), no
    training document, and every shard whose valid part holds a sample."""
    from data.datasets import build_datasets

    splits = build_datasets(sharded_config(tokenizer_dir, tmp_path, shards), 400, 40, 0)
    assert sorted(splits.valid_per_dataset) == sorted(LANGUAGES)
    for language, dataset in splits.valid_per_dataset.items():
        members = [e for e in splits.blends["valid"] if language_of(e.name) == language]
        parts = dataset.datasets if len(members) > 1 else [dataset]  # one shard: its own GPTDataset
        assert [d.dataset_path for d in parts] == [e.prefix for e in members]
        for part in parts:
            n = len(document_lengths(part.dataset_path))
            assert set(part.document_index) == set(range(round(0.8 * n), round(0.9 * n)))
        assert len(dataset) == sum(len(part) for part in parts)


def test_open_file_limit_is_raised_for_thousands_of_prefixes(caplog):
    """A soft `ulimit -n` of 1,024 (a common default) is raised towards the hard limit for a blend
    of 2,000 prefixes (about 17,000 maps), with one warning only where the hard limit is short."""
    import resource

    from data.open_files import BASE, PER_PREFIX, allow_open_files

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        allow_open_files(40)  # 1,344 wanted: raised too, little as it is
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == BASE + PER_PREFIX * 40
        allow_open_files(2000)
        need = BASE + PER_PREFIX * 2000
        limited = hard != resource.RLIM_INFINITY and hard < need
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == (hard if limited else need)
        assert any("ulimit -Hn" in r.getMessage() for r in caplog.records) == limited
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_killed_builds_staging_directory_is_removed_a_live_ones_kept(tmp_path):
    import subprocess
    import time

    from data.index_cache import remove_stale_staging

    gone = subprocess.Popen(["true"])
    gone.wait()
    here = socket.gethostname()
    dead = tmp_path / f".k1.tmp-{here}-{gone.pid}-aaaa"
    live = tmp_path / f".k2.tmp-{here}-{os.getpid()}-bbbb"
    elsewhere = tmp_path / ".k3.tmp-othernode-12-cccc"
    old = tmp_path / ".k4.tmp-othernode-13-dddd"
    published = tmp_path / "k5"
    for directory in (dead, live, elsewhere, old, published):
        directory.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert sorted(remove_stale_staging(tmp_path)) == sorted([dead, old])
    assert live.is_dir() and elsewhere.is_dir() and published.is_dir()
