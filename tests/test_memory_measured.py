"""The memory estimate's weights and optimizer parts against what a DeepSpeed run really holds,
on every rank for its own pipeline stage: DP2 fp32 at ZeRO 1, 2, 3; DP2 bf16 at ZeRO 1 and 2;
TP2 and PP2 fp32 at ZeRO 1 (one launch each). Measured: the engine's own parameter tensors
(ZeRO-3: the partitions DeepSpeed keeps in ds_tensor, and the small weights it keeps whole) and
the ZeRO optimizer's fp32 partition and Adam moments, each within 10% of
training/plan/memory_estimate.py; at bf16 ZeRO-1 also the fp32 gradient accumulation buffer
(DeepSpeed's BF16_Optimizer). Other stages' gradients and the pipeline's in-flight activations are not
measured here (the per-block activation bytes are in test_recompute / test_sequence_parallel)."""
import json

import pytest
import torch
import torch.distributed as dist

from parallelism.topology import Layout
from tests.multiprocess import run_processes

WIDE = ["model.hidden_size=256"]
CASES = [(Layout(1, 1, 2), 1, "fp32"), (Layout(1, 1, 2), 2, "fp32"), (Layout(1, 1, 2), 3, "fp32"),
         (Layout(1, 1, 2), 1, "bf16"), (Layout(1, 1, 2), 2, "bf16"),
         (Layout(2, 1, 1), 1, "fp32"), (Layout(1, 2, 1), 1, "fp32")]


def _measure(rank, layout, zero, precision, out):
    from tests.train_steps import make_engine, train
    from training.plan.memory_estimate import estimate

    from megatron.core import parallel_state

    cfg, engine = make_engine(WIDE + [f"parallel.zero_stage={zero}", f"trainer.precision={precision}",
                                      f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}"], layout)
    train(cfg, engine, layout, 0, 1)
    ds = engine.engine
    weights = 0
    for p in ds.module.parameters():
        part = getattr(p, "ds_tensor", None)
        held = part if (part is not None and p.data.numel() == 0) else p.data
        weights += held.numel() * held.element_size()
    opt = ds.optimizer
    # ZeRO-1/2: stage_1_and_2's fp32 partition; ZeRO-3: stage3's; bf16 at ZeRO-1: BF16_Optimizer's
    master = next(getattr(opt, name) for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                                                  "fp32_groups_flat_partition") if getattr(opt, name, None))
    # BF16_Optimizer accumulates the stage's whole gradients in fp32 (BLOOM-176B's setting)
    grads = sum(t.numel() * t.element_size() for t in getattr(opt, "fp32_groups_gradients_flat", []))
    optimizer = sum(t.numel() * t.element_size() for t in master)
    optimizer += sum(v.numel() * v.element_size() for s in opt.optimizer.state.values() for v in s.values()
                     if torch.is_tensor(v) and v.dim() > 0)
    stage_index = parallel_state.get_pipeline_model_parallel_rank()
    stage = estimate(cfg.model, layout, cfg.trainer.precision, zero, cfg.data.seq_length,
                     cfg.trainer.micro_batch_size, 1)[stage_index]
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rank": rank, "stage": stage_index, "weights": weights / 2 ** 30, "optimizer": optimizer / 2 ** 30,
                   "est_weights": stage.weights, "est_optimizer": stage.optimizer,
                   "gradients": grads / 2 ** 30, "est_gradients": stage.gradients}, f)
    dist.barrier()


@pytest.mark.parametrize("layout,zero,precision", CASES, ids=[f"tp{l.tp}pp{l.pp}dp{l.dp}-zero{z}-{p}" for l, z, p in CASES])
def test_weights_and_optimizer_state_match_the_estimate(layout, zero, precision, tmp_path):
    out = tmp_path / "measured.json"
    run_processes(_measure, layout, layout, zero, precision, str(out))
    for rank in range(layout.world_size):
        got = json.loads(open(f"{out}.{rank}").read())
        assert got["weights"] == pytest.approx(got["est_weights"], rel=0.10), got
        assert got["optimizer"] == pytest.approx(got["est_optimizer"], rel=0.10), got
        if precision == "bf16" and zero == 1:
            assert got["gradients"] == pytest.approx(got["est_gradients"], rel=0.10), got
