"""Precision and faults: bf16 with fp32 gradient accumulation trains through the pipeline with
ZeRO-1; fp16's loss scaler skips an injected overflow, lowers its scale there and raises it again
after its window, and training goes on; an injected NaN loss in fp32 is skipped with the weights
left exactly as they were, and reported; too many in a row stop the run with a message naming the
iterations.

The fp16 engine runs only where the device can run fp16 (many CPUs cannot: see
parallelism/precision_support.py); the loss scaler DeepSpeed builds from our config, and the
guard's handling of an overflow, are tested on every machine."""
import json
import math

import deepspeed
import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

from training.engine.deepspeed_config import deepspeed_config
from parallelism.precision_support import unsupported_reason
from parallelism.topology import Layout
from tests.multiprocess import run_processes
from tests.train_steps import TINY, run_steps
from training.config.loader import load_config
from training.guards import NonFiniteGuard, TrainingStopped

INJECT_AT = 2
FP16_UNSUPPORTED = unsupported_reason("fp16")
# A loss scaler that reacts within the test's few steps: down on the first overflow, up after 2.
QUICK_SCALER = ["trainer.hysteresis=1", "trainer.loss_scale_window=2"]
# A learning rate at which six steps lower the loss well above its noise (9.04 -> 8.1 in fp32), so
# "training goes on" is measured by the loss, not only by the weights moving.
LEARNS = ["optim.lr=1e-2"]


def loss_scaler(overrides: list):
    """The dynamic loss scaler DeepSpeed's ZeRO optimizer builds from our DeepSpeed config (the
    same factory and arguments as DeepSpeedEngine), without an fp16 engine; needs deepspeed.comm."""
    cfg = load_config(TINY + ["trainer.precision=fp16"] + list(overrides))
    ds = DeepSpeedConfig(deepspeed_config(cfg, Layout(1, 1, 1), cfg.trainer.global_batch_size))
    fp16 = ds.float16_config
    return CreateLossScaler(torch.half, fp16.loss_scale, fp16.loss_scale == 0, fp16.dynamic_loss_scale_args())


def scales_after(scaler, overflows) -> list:
    """The scale after each step, given whether each step overflowed."""
    scales = []
    for overflow in overflows:
        scaler.update_scale(overflow)
        scales.append(scaler.cur_scale)
    return scales


def _poison_final_norm(engine, value: float):
    """Multiply the last LayerNorm's output by `value` (inf or NaN) for the next step only."""
    module = engine.module
    final = module.ln_f if hasattr(module, "ln_f") else list(module.forward_funcs)[-2]
    return final.register_forward_hook(lambda _m, _i, out: out * value)


def _fault_worker(rank, precision, value, out, overrides=()):
    state = {"changed": []}  # changed[k]: step k moved the weights

    def hook(step, engine):
        now = [p.detach().clone() for p in engine.module.parameters()]
        if "last" in state:
            state["changed"].append(not all(torch.equal(a, b) for a, b in zip(state["last"], now)))
        state["last"] = now
        if "handle" in state:
            state.pop("handle").remove()
        if step == INJECT_AT:
            state["handle"] = _poison_final_norm(engine, value)

    results = run_steps([f"trainer.precision={precision}", *LEARNS, *overrides], Layout(1, 1, 1), 6, hook)
    if dist.get_rank() == 0:
        run = {"results": results, "changed": state["changed"]}
        if precision == "fp16":
            # What DeepSpeed's scaler, built from the same config, does when only the injected
            # step overflows (the engine initialized deepspeed.comm).
            overflows = [i == INJECT_AT for i in range(len(results))]
            run["expected_scales"] = scales_after(loss_scaler(overrides), overflows)
        with open(out, "w") as f:
            json.dump(run, f)


def _faults(tmp_path, precision, value, overrides=()):
    out = tmp_path / "faults.json"
    run_processes(_fault_worker, Layout(1, 1, 1), precision, value, str(out), list(overrides))
    return json.loads(out.read_text())


@pytest.mark.skipif(FP16_UNSUPPORTED is not None, reason=f"fp16 on this device: {FP16_UNSUPPORTED}")
def test_fp16_loss_scale_recovers_from_overflow(tmp_path):
    run = _faults(tmp_path, "fp16", math.inf, QUICK_SCALER)
    steps = run["results"]
    scales = [step["loss_scale"] for step in steps]
    assert steps[INJECT_AT]["skipped"], "the overflow was not reported"
    assert not run["changed"][INJECT_AT], "the overflow step changed the weights"
    assert scales[INJECT_AT] < scales[INJECT_AT - 1], f"the scale did not fall at the overflow: {scales}"
    assert scales[-1] > scales[INJECT_AT], f"the scale did not grow back after the window: {scales}"
    assert scales == run["expected_scales"]  # and no other step overflowed
    for step in steps[:INJECT_AT] + steps[INJECT_AT + 1:]:
        assert not step["skipped"] and math.isfinite(step["loss"])
    # Training goes on: every other step moves the weights, and the loss falls.
    assert all(run["changed"][:INJECT_AT] + run["changed"][INJECT_AT + 1:]), run["changed"]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1, [step["loss"] for step in steps]


@pytest.mark.parametrize("overrides", [[], QUICK_SCALER + ["trainer.initial_scale_power=5"]],
                         ids=["bigscience", "quick"])
def test_loss_scaler_from_our_config(single_process, overrides):
    """On every machine: the scaler DeepSpeed builds from our config starts at 2^initial_scale_power,
    halves only on the hysteresis-th overflow, and doubles back after loss_scale_window clean steps."""
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(TINY + ["trainer.precision=fp16"] + overrides)
    fp16 = deepspeed_config(cfg, Layout(1, 1, 1), cfg.trainer.global_batch_size)["fp16"]
    start, hysteresis, window = 2 ** fp16["initial_scale_power"], fp16["hysteresis"], fp16["loss_scale_window"]
    assert (fp16["hysteresis"], fp16["loss_scale_window"]) == (cfg.trainer.hysteresis, cfg.trainer.loss_scale_window)
    scaler = loss_scaler(overrides)
    assert scaler.cur_scale == start
    overflows = scales_after(scaler, [True] * hysteresis)
    assert overflows == [start] * (hysteresis - 1) + [start / 2]
    clean = scales_after(scaler, [False] * (window + 1))
    assert clean[:window - 1] == [start / 2] * (window - 1), "grew back before its window"
    assert clean[-1] == start, "did not grow back after its window"


def test_guard_overflow_is_not_a_non_finite_step():
    """fp16 overflows, however many in a row, are reported and never stop the run, nor count
    towards the non-finite steps that do."""
    guard = NonFiniteGuard(limit=2)
    for iteration in range(1, 6):
        assert "fp16 overflow" in guard.update(iteration, 2.0, math.inf, True, overflow=True)
    assert "skipped" in guard.update(6, math.nan, math.nan, True)  # the first that counts
    with pytest.raises(TrainingStopped, match="iterations 6-7"):
        guard.update(7, math.nan, math.nan, True)


def test_fp32_nan_loss_is_skipped_and_weights_kept(tmp_path):
    run = _faults(tmp_path, "fp32", math.nan)
    steps = run["results"]
    assert math.isnan(steps[INJECT_AT]["loss"]) and steps[INJECT_AT]["skipped"]
    assert not run["changed"][INJECT_AT], "a NaN step changed the weights"
    for step in steps[INJECT_AT + 1:]:
        assert not step["skipped"] and math.isfinite(step["loss"])
    assert all(run["changed"][:INJECT_AT] + run["changed"][INJECT_AT + 1:]), run["changed"]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1, [step["loss"] for step in steps]


def _bf16_worker(rank, out):
    results = run_steps(["trainer.precision=bf16", "parallel.pp=2", "parallel.zero_stage=1", *LEARNS],
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
