"""Replicated parameters stay identical across TP ranks through training (TP2, 5 steps, exact), and
a drift forced onto one rank is measured and repaired from TP rank 0, also under bf16 ZeRO-1 and
ZeRO-3, where the repair must reach the fp32 masters or the next step would bring the drift back.

Besides sync_replicated_parameters' own measure (taken before each step, as the trainer takes it at
its log interval), every run ends with an independent one after its final optimizer step: each TP
rank's replicated weights (and, under ZeRO, their fp32 masters) all-gathered and compared with TP
rank 0's, exactly, so a drift made by the last step cannot go unmeasured."""
import json

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from parallelism.topology import Layout
from parallelism.tp_replicas import replicated_parameters, sync_replicated_parameters
from tests.multiprocess import run_processes
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from tests.train_steps import make_engine, train


def tp_spread(tensors: list) -> float:
    """Largest difference of any element from TP rank 0's copy, over the TP group: all_gather and
    compare, independently of sync_replicated_parameters (which also repairs what it measures)."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    group = parallel_state.get_tensor_model_parallel_group()
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(copies, flat, group=group)
    return max((c - copies[0]).abs().max().item() for c in copies)


def _worker(rank, out):
    drifts = []

    def hook(step, engine):
        drifts.append(sync_replicated_parameters(engine.module))

    layout = Layout(2, 1, 1)
    cfg, engine = make_engine(["parallel.tp=2"], layout)
    replicated = replicated_parameters(engine.module)
    initial = [p.detach().clone() for p in replicated]
    train(cfg, engine, layout, 0, 5, hook)
    final = tp_spread(replicated)  # after the 5th (last) optimizer step
    final_by_sync = sync_replicated_parameters(engine.module)
    changed = max((a.detach() - b).abs().max().item()  # training did move them
                  for a, b in zip(replicated, initial))
    # Force a drift on TP rank 1 and repair it.
    from training.config.loader import load_config
    from training.model.bloom import build_model
    from tests.train_steps import TINY

    model = build_model(load_config(TINY).model, seed=3)
    norm = model.h[0].input_layernorm.weight
    if parallel_state.get_tensor_model_parallel_rank() == 1:
        with torch.no_grad():
            norm.add_(0.5)
    forced = sync_replicated_parameters(model)
    after = sync_replicated_parameters(model)
    count = len(replicated_parameters(model))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"drifts": drifts, "forced": forced, "after": after, "replicated": count,
                       "final": final, "final_by_sync": final_by_sync, "changed": changed}, f)


def test_replicas_identical_and_repaired(tmp_path):
    out = tmp_path / "replicas.json"
    run_processes(_worker, Layout(2, 1, 1), str(out))
    got = json.loads(out.read_text())
    assert got["drifts"] == [0.0] * 5  # exact: checked before each of the 5 steps
    assert got["final"] == 0.0 and got["final_by_sync"] == 0.0  # and after the last one
    assert got["changed"] > 1e-4  # the replicas compared are trained ones, not the initial values
    assert abs(got["forced"] - 0.5) < 1e-6 and got["after"] == 0.0
    # embedding LN (2) + 4 blocks x (2 LNs x 2 + 2 row-parallel biases) + ln_f (2)
    assert got["replicated"] == 2 + 4 * 6 + 2


def _zero_worker(rank, stage, out):
    layout = Layout(2, 1, 1)
    cfg, engine = make_engine(["parallel.tp=2", f"parallel.zero_stage={stage}",
                               "trainer.precision=bf16"], layout)
    train(cfg, engine, layout, 0, 1)
    norm = replicated_parameters(engine.module)[0]
    master = safe_get_full_fp32_param(norm)
    if parallel_state.get_tensor_model_parallel_rank() == 1:  # the weight and its master drift
        with torch.no_grad():
            norm.add_(0.5)
        safe_set_full_fp32_param(norm, master + 0.5)
    forced = sync_replicated_parameters(engine.module)
    repaired_master = (safe_get_full_fp32_param(norm) - master).abs().max()
    dist.all_reduce(repaired_master, op=dist.ReduceOp.MAX)  # rank 1's master is rank 0's again
    train(cfg, engine, layout, 1, 2)  # ZeRO copies the masters into the bf16 weights each step
    replicated = replicated_parameters(engine.module)  # after the final optimizer step:
    final_weights = tp_spread(replicated)
    final_masters = tp_spread([safe_get_full_fp32_param(p) for p in replicated])  # DP collective
    after = sync_replicated_parameters(engine.module)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"forced": forced, "repaired_master": repaired_master.item(), "after": after,
                       "dtype": str(norm.dtype), "final_weights": final_weights,
                       "final_masters": final_masters}, f)


@pytest.mark.parametrize("stage", [1, 3], ids=["zero1", "zero3"])
def test_zero_masters_are_repaired_too(tmp_path, stage):
    out = tmp_path / "zero.json"
    run_processes(_zero_worker, Layout(2, 1, 1), stage, str(out))
    got = json.loads(out.read_text())
    assert got["dtype"] == "torch.bfloat16"
    assert abs(got["forced"] - 0.5) < 1e-6
    assert got["repaired_master"] == 0.0  # both ranks' masters hold rank 0's values
    assert got["after"] == 0.0  # two steps later the replicas are still identical
    # ...measured independently after the final step, weights and fp32 masters alike
    assert got["final_weights"] == 0.0 and got["final_masters"] == 0.0
