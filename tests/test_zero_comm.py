"""DeepSpeed's ZeRO communication settings come from parallel.* (configs/parallel/default.yaml) with
defaults per stage, reach DeepSpeed's engine, and overlapping the gradient reduction with backward
(overlap_comm, ZeRO-2, DP2 over gloo, buckets small enough that the model takes several) trains the
same 5 steps as not overlapping it (bitwise here; asserted within 1e-4).

The launch is TP2 x DP2 with sequence parallelism, so it also shows the sum over TP of the
replicated parameters' gradients (tensor hooks) landing before ZeRO-2's bucketed reduction: both
runs match the single-process losses and gradient norms (1e-4)."""
import json

import pytest
import torch.distributed as dist

from training.engine.deepspeed_config import deepspeed_config
from parallelism.topology import Layout
from tests.multiprocess import run_processes
from tests.test_layout_parity import STEPS, assert_steps_match
from tests.train_steps import make_engine, train
from training.config.checks import validate
from training.config.loader import ConfigError, load_config

BUCKETS = {"reduce_bucket_size": 500_000_000}
EXPECTED = {
    0: {"stage": 0, **BUCKETS},
    1: {"stage": 1, **BUCKETS, "overlap_comm": False, "contiguous_gradients": True,
        "allgather_bucket_size": 500_000_000},
    2: {"stage": 2, **BUCKETS, "overlap_comm": True, "contiguous_gradients": True,
        "allgather_bucket_size": 500_000_000},
    3: {"stage": 3, **BUCKETS, "overlap_comm": True, "contiguous_gradients": True,
        "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000},
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_section_per_stage(stage):
    cfg = load_config([f"parallel.zero_stage={stage}"])
    assert deepspeed_config(cfg, Layout(1, 1, 1), 8)["zero_optimization"] == EXPECTED[stage]


def test_zero_settings_follow_the_config():
    cfg = load_config(["parallel.zero_stage=2", "parallel.overlap_comm=false", "parallel.reduce_bucket_size=1000",
                       "parallel.allgather_bucket_size=2000", "parallel.contiguous_gradients=false"])
    zero = deepspeed_config(cfg, Layout(1, 1, 1), 8)["zero_optimization"]
    assert zero == {"stage": 2, "overlap_comm": False, "contiguous_gradients": False,
                    "reduce_bucket_size": 1000, "allgather_bucket_size": 2000}
    cfg = load_config(["parallel.zero_stage=3", "parallel.stage3_param_persistence_threshold=0"])
    assert deepspeed_config(cfg, Layout(1, 1, 1), 8)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    with pytest.raises(ConfigError, match=r"^parallel.reduce_bucket_size=0 must be positive$"):
        validate(load_config(["parallel.reduce_bucket_size=0"]), 1)


# 100k-element buckets: the tiny model's 1.8M parameters (half per DP rank) go in several.
SMALL_BUCKETS = ["parallel.zero_stage=2", "parallel.reduce_bucket_size=100000",
                 "parallel.allgather_bucket_size=100000", "parallel.tp=2", "parallel.sequence_parallel=true"]
LAYOUT = Layout(2, 1, 2)


def _worker(rank, layout: Layout, out: str) -> None:
    runs = {}
    for overlap in (False, True):
        cfg, engine = make_engine(SMALL_BUCKETS + [f"parallel.overlap_comm={str(overlap).lower()}"], layout)
        ds = engine.engine
        # DeepSpeed read our settings (its engine's accessors, and the ZeRO optimizer it built).
        assert (ds.zero_optimization_stage(), ds.zero_overlap_comm(), ds.zero_reduce_bucket_size()) == \
            (2, overlap, 100000)
        assert ds.optimizer.overlap_comm is overlap and ds.optimizer.partition_gradients
        runs[overlap] = train(cfg, engine, layout, 0, STEPS)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({str(k): v for k, v in runs.items()}, f)


def test_overlap_comm_trains_the_same(tmp_path, single_process_steps):
    out = tmp_path / "runs.json"
    run_processes(_worker, LAYOUT, LAYOUT, str(out))
    runs = json.loads(out.read_text())
    assert_steps_match(runs["True"], runs["False"], "overlap_comm=false")
    reference = single_process_steps
    assert_steps_match(runs["False"], reference)
    assert_steps_match(runs["True"], reference)
