"""Replicated parameters stay identical across TP ranks through training (TP2, 5 steps, exact), and
a drift forced onto one rank is measured and repaired from TP rank 0, also under bf16 ZeRO-1 and
ZeRO-3, where the repair must reach the fp32 masters or the next step would bring the drift back."""
import json

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from parallelism.topology import Layout
from parallelism.tp_replicas import replicated_parameters, sync_replicated_parameters
from tests.multiprocess import run_processes
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from tests.train_steps import make_engine, run_steps, train


def _worker(rank, out):
    drifts = []

    def hook(step, engine):
        drifts.append(sync_replicated_parameters(engine.module))

    run_steps(["parallel.tp=2"], Layout(2, 1, 1), 5, hook)
    # Force a drift on TP rank 1 and repair it.
    from training.config_loader import load_config
    from training.model import build_model
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
            json.dump({"drifts": drifts, "forced": forced, "after": after, "replicated": count}, f)


def test_replicas_identical_and_repaired(tmp_path):
    out = tmp_path / "replicas.json"
    run_processes(_worker, Layout(2, 1, 1), str(out))
    got = json.loads(out.read_text())
    assert got["drifts"] == [0.0] * 5  # exact: checked before each of the 5 steps
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
    after = sync_replicated_parameters(engine.module)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"forced": forced, "repaired_master": repaired_master.item(), "after": after,
                       "dtype": str(norm.dtype)}, f)


@pytest.mark.parametrize("stage", [1, 3], ids=["zero1", "zero3"])
def test_zero_masters_are_repaired_too(tmp_path, stage):
    out = tmp_path / "zero.json"
    run_processes(_zero_worker, Layout(2, 1, 1), stage, str(out))
    got = json.loads(out.read_text())
    assert got["dtype"] == "torch.bfloat16"
    assert abs(got["forced"] - 0.5) < 1e-6
    assert got["repaired_master"] == 0.0  # both ranks' masters hold rank 0's values
    assert got["after"] == 0.0  # two steps later the replicas are still identical
