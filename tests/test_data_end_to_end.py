"""From the demo DataConfig to batches: tokenizer trained and data preprocessed on demand,
reused on the next call, and two real ranks (gloo) sharing rank 0's index caches."""
import os
import pickle
import socket

import pytest
import torch
import torch.multiprocessing as mp

from data.batch_schedule import BatchSchedule
from data.config import DataConfig, TokenizerConfig
from data.datasets import build_datasets
from data.prepare import prepare_data
from data.sampler import iter_global_batches
from tests.test_data_helpers import process_group  # noqa: F401


def small_demo(cache) -> DataConfig:
    return DataConfig(seq_length=64, cache_dir=str(cache), split="80,10,10",
                      tokenizer=TokenizerConfig(vocab_size=1000))


@pytest.mark.usefixtures("process_group")
def test_prepare_trains_and_preprocesses_once(tmp_path):
    """The demo config (shipped corpus, no tokenizer given) trains a tokenizer and preprocesses
    40 datasets under cache_dir; a second call reuses both (same directories, untouched)."""
    cfg = small_demo(tmp_path)
    first = prepare_data(cfg)
    assert first.tokenizer_dir.parent == tmp_path and len(first.summary["outputs"]) == 40
    stamp = os.stat(first.processed_dir / "summary.json").st_mtime_ns
    second = prepare_data(cfg)
    assert (second.tokenizer_dir, second.processed_dir) == (first.tokenizer_dir, first.processed_dir)
    assert os.stat(second.processed_dir / "summary.json").st_mtime_ns == stamp


def _rank_main(rank: int, port: int, cache: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    splits = build_datasets(small_demo(cache), 200, 0, 0)
    schedule = BatchSchedule(8, 2, 2, None)
    micro = [mb["tokens"] for _, mbs in zip(range(3), iter_global_batches(splits.train, schedule, 0, rank))
             for mb in mbs[1]]
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(micro, f)
    torch.distributed.destroy_process_group()


def test_two_ranks_share_rank0_caches_and_split_each_global_batch(tmp_path):
    """Two processes over gloo: rank 0 trains, preprocesses and builds the index caches (the
    other waits), both read the same dataset, and their micro-batches interleaved are the
    DP=1 sequence computed here in a single process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(tmp_path), str(tmp_path / "out")), nprocs=2,
                       start_method="spawn", join=True)
    ranks = [pickle.loads((tmp_path / f"out.{r}").read_bytes()) for r in range(2)]
    assert len(list((tmp_path / "indices").iterdir())) >= 1
    assert not [p for p in (tmp_path / "indices").iterdir() if ".tmp-" in p.name]
    import torch.distributed as dist

    from data.distributed import ensure_process_group

    created = not dist.is_initialized()
    ensure_process_group()
    try:
        single = build_datasets(small_demo(tmp_path), 200, 0, 0).train
    finally:
        if created:
            dist.destroy_process_group()
    interleaved = [mb for pair in zip(*ranks) for mb in pair]
    reference = [single[i]["tokens"] for i in range(len(interleaved) * 2)]
    assert torch.equal(torch.cat(interleaved), torch.stack(reference))
