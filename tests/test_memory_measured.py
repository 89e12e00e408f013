"""The memory estimate's weights and optimizer parts against what a DeepSpeed run really holds
(DP2, fp32, ZeRO 1, 2, 3, one launch each): the engine's own parameter tensors (ZeRO-3: the
partitions DeepSpeed keeps in ds_tensor, and the small weights it keeps whole) and the ZeRO
optimizer's fp32 partition and Adam moments, each within 10% of training/plan/memory_estimate.py.
Gradients, activations at PP2 and the bf16 paths are not measured here (the per-block activation
bytes are in test_recompute / test_sequence_parallel)."""
import json

import pytest
import torch
import torch.distributed as dist

from parallelism.topology import Layout
from tests.multiprocess import run_processes

WIDE = ["model.hidden_size=256"]
LAYOUT = Layout(1, 1, 2)


def _measure(rank, zero, out):
    from tests.train_steps import make_engine, train
    from training.plan.memory_estimate import estimate

    cfg, engine = make_engine(WIDE + [f"parallel.zero_stage={zero}"], LAYOUT)
    train(cfg, engine, LAYOUT, 0, 1)
    ds = engine.engine
    weights = 0
    for p in ds.module.parameters():
        part = getattr(p, "ds_tensor", None)
        held = part if (part is not None and p.data.numel() == 0) else p.data
        weights += held.numel() * held.element_size()
    opt = ds.optimizer
    master = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat
    optimizer = sum(t.numel() * t.element_size() for t in master)
    optimizer += sum(v.numel() * v.element_size() for s in opt.optimizer.state.values() for v in s.values()
                     if torch.is_tensor(v) and v.dim() > 0)
    stage = estimate(cfg.model, LAYOUT, cfg.trainer.precision, zero, cfg.data.seq_length,
                     cfg.trainer.micro_batch_size, 1)[0]
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"weights": weights / 2 ** 30, "optimizer": optimizer / 2 ** 30,
                       "est_weights": stage.weights, "est_optimizer": stage.optimizer}, f)
    dist.barrier()


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_weights_and_optimizer_state_match_the_estimate(zero, tmp_path):
    out = tmp_path / "measured.json"
    run_processes(_measure, LAYOUT, zero, str(out))
    got = json.loads(out.read_text())
    assert got["weights"] == pytest.approx(got["est_weights"], rel=0.10), got
    assert got["optimizer"] == pytest.approx(got["est_optimizer"], rel=0.10), got
