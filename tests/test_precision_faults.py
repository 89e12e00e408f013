"""Precision and faults: bf16 with fp32 gradient accumulation trains through the pipeline with
ZeRO-1; fp16's loss scaler skips an injected overflow and training goes on; an injected NaN loss in
fp32 is skipped with the weights left exactly as they were, and reported; too many in a row stop
the run with a message naming the iterations."""
import json
import math

import pytest
import torch
import torch.distributed as dist

from parallelism.topology import Layout
from tests.multiprocess import run_processes
from tests.train_steps import run_steps
from training.train import NonFiniteGuard, TrainingStopped

INJECT_AT = 2


def _poison_final_norm(engine, value: float):
    """Multiply the last LayerNorm's output by `value` (inf or NaN) for the next step only."""
    module = engine.module
    final = module.ln_f if hasattr(module, "ln_f") else list(module.forward_funcs)[-2]
    return final.register_forward_hook(lambda _m, _i, out: out * value)


def _fault_worker(rank, precision, value, out):
    state = {}

    def hook(step, engine):
        if "handle" in state:
            state.pop("handle").remove()
            after = [p.detach().clone() for p in engine.module.parameters()]
            state["unchanged"] = all(torch.equal(a, b) for a, b in zip(state["before"], after))
        if step == INJECT_AT:
            state["before"] = [p.detach().clone() for p in engine.module.parameters()]
            state["handle"] = _poison_final_norm(engine, value)

    results = run_steps([f"trainer.precision={precision}"], Layout(1, 1, 1), 6, hook)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"results": results, "unchanged": state["unchanged"]}, f)


def _faults(tmp_path, precision, value):
    out = tmp_path / "faults.json"
    run_processes(_fault_worker, Layout(1, 1, 1), precision, value, str(out))
    return json.loads(out.read_text())


def test_fp16_loss_scale_recovers_from_overflow(tmp_path):
    run = _faults(tmp_path, "fp16", math.inf)
    steps = run["results"]
    assert steps[INJECT_AT]["skipped"] and run["unchanged"]
    assert steps[INJECT_AT + 1]["loss_scale"] <= steps[INJECT_AT - 1]["loss_scale"]
    for step in steps[INJECT_AT + 1:]:
        assert not step["skipped"] and math.isfinite(step["loss"])
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_fp32_nan_loss_is_skipped_and_weights_kept(tmp_path):
    run = _faults(tmp_path, "fp32", math.nan)
    steps = run["results"]
    assert math.isnan(steps[INJECT_AT]["loss"]) and steps[INJECT_AT]["skipped"]
    assert run["unchanged"], "a NaN step changed the weights"
    for step in steps[INJECT_AT + 1:]:
        assert not step["skipped"] and math.isfinite(step["loss"])
    assert steps[-1]["loss"] < steps[0]["loss"]


def _bf16_worker(rank, out):
    results = run_steps(["trainer.precision=bf16", "parallel.pp=2", "parallel.zero_stage=1"],
                        Layout(1, 2, 2), 6)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def test_bf16_pipeline_zero1_trains(tmp_path):
    out = tmp_path / "bf16.json"
    run_processes(_bf16_worker, Layout(1, 2, 2), str(out))
    losses = [r["loss"] for r in json.loads(out.read_text())]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses


def test_guard_reports_then_stops():
    guard = NonFiniteGuard(limit=3)
    assert guard.update(1, 2.0, 1.0, False) is None
    assert "skipped" in guard.update(2, math.nan, math.nan, True)
    assert guard.update(3, 2.0, 1.0, False) is None  # a good step resets the count
    assert "fp16 overflow" in guard.update(4, 2.0, math.inf, True, overflow=True)
    guard.update(5, math.nan, 1.0, True)
    guard.update(6, math.inf, 1.0, True)
    with pytest.raises(TrainingStopped, match="iterations 5-7"):
        guard.update(7, math.nan, 1.0, True)
