"""Loss spikes: detected, skipped, rolled back, the data range skipped, and every run exact.

Unit tests of the detector (training/spikes.py) and of the skip ranges, then real runs of the
Trainer at DP2 with BigScience's dropout 0.1, spikes injected by trainer.spike.inject_at (the
loss, and so every gradient, multiplied by 50 at chosen iterations), all in one launch:
- a spike is skipped with the weights and Adam state exactly as before it (the checkpoints saved
  on either side of it hold the same tensors), at DP2 and at PP2 (where the loss the detector
  needs lives on the last stage only, and is reduced and broadcast before the optimizer step);
- two spikes roll back to the checkpoint before them and skip their iterations: the run then
  equals, bitwise, step by step, a run given that range by hand (trainer.skip_train_iteration_range);
- the hand-set range is checked against a reference that does not use it: the checkpoint before
  the range, stepped by hand on the sampler's batch at the data position after it, gives the
  skipping run's loss and gradient norm after the range bitwise; the steps before the range equal
  an unskipped run's;
- a run resumed from a checkpoint saved after the rollback (its skip range and detector window
  come from the checkpoint) equals the uninterrupted one bitwise, including a later spike that
  only an armed detector (a restored window) catches;
- every rank saw the same losses and gradient norms and made the same decisions.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallelism.topology import Layout
from tests.bloom_train import TINY_RUN, bloom_train, data_cache, run_trainer  # noqa: F401
from tests.multiprocess import run_processes
from training.config.loader import ConfigError, load_config
from training.spikes import SkipRanges, SpikeDetector

DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
ITERS = 13
BASE = TINY_RUN + DROPOUT + [f"trainer.train_iters={ITERS}", "trainer.save_interval=3"]
# Armed after 4 steps; 2 spikes within 5 iterations roll back.
DETECTOR = ["trainer.spike.enabled=true", "trainer.spike.window=8", "trainer.spike.min_history=4",
            "trainer.spike.max_spikes=2", "trainer.spike.rollback_window=5", "trainer.spike.inject_factor=50"]
ROLLBACK = DETECTOR + ["trainer.spike.inject_at=[8,9,11]"]


# -- the detector and the ranges, alone -------------------------------------------------------

def detector(**overrides) -> SpikeDetector:
    cfg = load_config([f"trainer.spike.{k}={v}" for k, v in overrides.items()]).trainer.spike
    return SpikeDetector(cfg)


def fill(d: SpikeDetector, losses, norms=None):
    for i, loss in enumerate(losses):
        d.record(i + 1, loss, (norms or [1.0] * len(losses))[i], spike=False, applied=True)


def test_detector_arms_after_min_history_and_needs_both_thresholds():
    d = detector(window=10, min_history=5, loss_z=3.0, loss_ratio=1.2)
    noisy = [3.0, 3.1, 2.9, 3.05, 2.95]
    fill(d, noisy[:4])
    assert d.check(100.0, 1.0) is None  # not armed yet: 4 of 5 steps
    fill(d, noisy[4:])
    assert "loss 100" in d.check(100.0, 1.0)
    assert d.check(3.3, 1.0) is None  # z 4.7 but x1.1: the ratio test holds it back
    flat = detector(window=10, min_history=5, loss_z=3.0, loss_ratio=1.2)
    fill(flat, [3.0] * 5)
    assert flat.check(3.0001, 1.0) is None  # a plateau: infinite z, ratio 1.00003
    assert flat.check(3.7, 1.0) is not None
    assert d.check(math.nan, 1.0) is None and d.check(math.inf, 1.0) is None  # the non-finite guard's


def test_detector_watches_the_gradient_norm_and_ignores_skipped_steps():
    d = detector(window=4, min_history=3, grad_norm_z=2.0, grad_norm_ratio=3.0)
    fill(d, [3.0, 3.0, 3.0], [1.0, 1.2, 0.8])
    assert "grad norm 5" in d.check(3.0, 5.0)
    assert d.check(3.0, 2.0) is None  # z 6 but x2
    d.record(4, 3.0, 5.0, spike=True, applied=False)
    d.record(5, 9.0, 9.0, spike=False, applied=False)  # skipped for another reason (non-finite)
    assert [g for _, g in d.window] == [1.0, 1.2, 0.8]  # neither entered the window
    off = detector(window=4, min_history=3, grad_norm_z="null", grad_norm_ratio="null")
    fill(off, [3.0, 3.0, 3.0], [1.0, 1.2, 0.8])
    assert off.check(3.0, 500.0) is None


def test_rollback_after_max_spikes_within_the_window_and_state_round_trip():
    d = detector(window=8, min_history=2, max_spikes=3, rollback_window=10)
    fill(d, [3.0, 3.1])
    for it in (20, 27):
        d.record(it, 50.0, 9.0, spike=True, applied=False)
        assert d.rollback_range(it) is None
    d.record(31, 50.0, 9.0, spike=True, applied=False)
    assert d.rollback_range(31) is None  # 20 left the 10-iteration window: 2 spikes in it
    d.record(33, 50.0, 9.0, spike=True, applied=False)
    assert d.rollback_range(33) == (27, 33)
    copy = detector(window=8, min_history=2, max_spikes=3, rollback_window=10)
    copy.load_state_dict(json.loads(json.dumps(d.state_dict())))
    assert copy.state_dict() == d.state_dict() and copy.check(4.0, 1.0) == d.check(4.0, 1.0)
    never = detector(min_history=1, max_spikes=0)
    never.record(1, 50.0, 9.0, spike=True, applied=False)
    assert never.rollback_range(1) is None


def test_skip_ranges_parse_merge_and_refuse_bad_input():
    ranges = SkipRanges.parse(["1000-1100", "5", " 1101-1200 "])
    assert ranges.to_list() == [[5, 5], [1000, 1200]]
    assert ranges.end_of(5) == 5 and ranges.end_of(1050) == 1200 and ranges.end_of(6) is None
    ranges.add(4, 6)
    assert ranges.to_list() == [[4, 6], [1000, 1200]]
    for bad in ("x-y", "9-8", "0-3", "3-"):
        with pytest.raises(ConfigError, match="skip_train_iteration_range") as error:
            SkipRanges.parse([bad])
        assert "\n" not in str(error.value)


def test_bad_range_is_one_line_from_bloom_train(tmp_path):
    run = bloom_train(TINY_RUN + [f"trainer.run_dir={tmp_path}", "trainer.skip_train_iteration_range=[9-8]"])
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "'9-8'" in lines[0], run.stderr


# -- real runs, in one launch -----------------------------------------------------------------

def final_records(run_dir) -> dict:
    """{step: its last record that trained or skipped it} (a rollback logs a step again)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "lm_loss" in record or record.get("data_skipped"):
            out[record["step"]] = {k: record.get(k) for k in ("lm_loss", "grad_norm", "consumed_samples",
                                                              "skipped", "spike", "data_skipped")}
    return out


def records(run_dir) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _dump(trainer, path: Path) -> None:
    """What each rank saw and decided, for the agreement check."""
    import torch.distributed as dist

    seen = {"detector": trainer.spikes.state_dict(), "skips": trainer.skips.to_list(),
            "history": trainer.state.history, "rollbacks": trainer.rollbacks}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)
    if dist.get_rank() == 0:
        path.write_text(json.dumps(everyone))


def _single_spike(tmp: Path, common: list) -> None:
    """A spike at 5 (no rollback): checkpoints at 4 and at 5 (the exit's) must hold the same state."""
    trainer = run_trainer(common + DETECTOR + [f"trainer.run_dir={tmp / 'single'}", "trainer.train_iters=5",
                                               "trainer.save_interval=4", "trainer.spike.inject_at=[5]"])
    _dump(trainer, tmp / "single.json")


def _reference_after_range(tmp: Path, common: list) -> None:
    """Independent of the skip code: train to 7 without any range, then step by hand on the
    sampler's batch at the position two global batches further (after iterations 8 and 9)."""
    import torch.distributed as dist

    from data.sampler import iter_global_batches
    from training.lr_schedule import learning_rate

    trainer = run_trainer(common + [f"trainer.run_dir={tmp / 'reference'}", "trainer.train_iters=7"])
    position = trainer.state.consumed_samples
    for _ in range(2):
        position += trainer.schedule.global_batch(position)
    _, micro = next(iter_global_batches(trainer.data.train, trainer.schedule, position, trainer.dp_rank))
    trainer.engine.set_learning_rate(learning_rate(trainer.cfg.optim, position))
    result = trainer.engine.train_step(micro)
    if dist.get_rank() == 0:
        (tmp / "reference.json").write_text(json.dumps({"loss": result.loss, "grad_norm": result.grad_norm,
                                                        "position": position}))


def _spike_runs(rank, layout, cache, tmp, which, extra=()):
    tmp = Path(tmp)
    common = BASE + [f"data.cache_dir={cache}", f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", *extra]
    if "single" in which:
        _single_spike(tmp, common)
    if "rollback" not in which:
        return
    whole = run_trainer(common + ROLLBACK + [f"trainer.run_dir={tmp / 'rollback'}"])
    _dump(whole, tmp / "rollback.json")
    by_hand = run_trainer(common + DETECTOR + [f"trainer.run_dir={tmp / 'by-hand'}", "trainer.spike.inject_at=[11]",
                                               "trainer.skip_train_iteration_range=[8-9]"])
    _dump(by_hand, tmp / "by-hand.json")
    resumed = run_trainer(common + ROLLBACK + [f"trainer.run_dir={tmp / 'resumed'}",
                                              f"trainer.resume={tmp / 'rollback' / 'checkpoints' / 'iter_00000009'}"])
    _dump(resumed, tmp / "resumed.json")
    _reference_after_range(tmp, common)


@pytest.fixture(scope="module")
def dp2_runs(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("spikes-dp2")
    run_processes(_spike_runs, Layout(1, 1, 2), Layout(1, 1, 2), data_cache, str(tmp), ["single", "rollback"])
    return tmp


def _tensors(checkpoint: Path) -> dict:
    out = {}
    for path in sorted([*checkpoint.glob("model/*.safetensors"), *checkpoint.glob("optim/*.safetensors")]):
        out.update({f"{path.parent.name}/{path.name}/{k}": v for k, v in load_file(path).items()})
    return out


def _assert_spike_skipped_exactly(tmp: Path):
    metrics = final_records(tmp / "single")
    assert [s for s, r in metrics.items() if r["spike"]] == [5] and metrics[5]["skipped"]
    assert metrics[5]["lm_loss"] > 20 * metrics[4]["lm_loss"]  # the injected spike, as logged
    checkpoints = tmp / "single" / "checkpoints"
    before, after = _tensors(checkpoints / "iter_00000004"), _tensors(checkpoints / "iter_00000005")
    assert before.keys() == after.keys() and any("exp_avg" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before), "a spike changed the weights or Adam's state"
    meta = [json.loads((checkpoints / c / "optim" / "meta.json").read_text()) for c in ("iter_00000004", "iter_00000005")]
    assert meta[0]["adam_step"] == meta[1]["adam_step"] == 4
    ranks = json.loads((tmp / "single.json").read_text())
    assert all(rank == ranks[0] for rank in ranks), "the ranks saw different losses or decided differently"


def test_a_spike_is_skipped_with_weights_unchanged_dp2(dp2_runs):
    _assert_spike_skipped_exactly(dp2_runs)


def test_two_spikes_roll_back_and_skip_their_range(dp2_runs):
    lines = records(dp2_runs / "rollback")
    rollbacks = [r for r in lines if "rollback" in r]
    assert [r["rollback"] for r in rollbacks] == [{"at": 9, "to": 6, "skip": [8, 9]}]
    before = {r["step"]: r for r in lines[:lines.index(rollbacks[0])] if "lm_loss" in r}
    assert [s for s, r in before.items() if r["spike"]] == [8, 9]  # detected, skipped, then rolled back
    final = final_records(dp2_runs / "rollback")
    assert sorted(final) == list(range(1, ITERS + 1))
    assert [s for s, r in final.items() if r["data_skipped"]] == [8, 9]
    assert [s for s, r in final.items() if r["spike"]] == [11]  # after the rollback, one spike: skipped only
    assert [final[s]["consumed_samples"] for s in final] == [4 * s for s in final]  # the skip consumed its batches
    saved = json.loads((dp2_runs / "rollback" / "checkpoints" / "iter_00000012" / "trainer_state.json").read_text())
    assert saved["spikes"]["skip_ranges"] == [[8, 9]] and saved["spikes"]["rollbacks"] == [{"at": 9, "to": 6, "skip": [8, 9]}]
    ranks = json.loads((dp2_runs / "rollback.json").read_text())
    assert all(rank == ranks[0] for rank in ranks), "the ranks saw different losses or decided differently"


def test_rollback_equals_the_range_skipped_by_hand(dp2_runs):
    assert final_records(dp2_runs / "rollback") == final_records(dp2_runs / "by-hand")  # bitwise, every step


def test_range_skipped_by_hand_against_a_reference_without_it(dp2_runs):
    by_hand, plain = final_records(dp2_runs / "by-hand"), final_records(dp2_runs / "reference")
    assert all(by_hand[s] == plain[s] for s in range(1, 8))
    reference = json.loads((dp2_runs / "reference.json").read_text())
    assert reference["position"] == by_hand[9]["consumed_samples"]
    assert (by_hand[10]["lm_loss"], by_hand[10]["grad_norm"]) == (reference["loss"], reference["grad_norm"])


def test_run_resumed_after_the_rollback_is_exact(dp2_runs):
    whole, resumed = final_records(dp2_runs / "rollback"), final_records(dp2_runs / "resumed")
    assert sorted(resumed) == list(range(10, ITERS + 1))
    assert all(resumed[s] == whole[s] for s in resumed)
    assert resumed[11]["spike"]  # caught by the window restored from the checkpoint
    ranks = json.loads((dp2_runs / "resumed.json").read_text())
    assert ranks[0]["skips"] == [[8, 9]] and ranks[0]["rollbacks"] == [{"at": 9, "to": 6, "skip": [8, 9]}]


# PP2: the first stage holds no loss; the one reduced on the last stage reaches it before the step.
# TP2 at ZeRO 0: the gradient norm is the engine's own (_clip_in_optimizer_step), not DeepSpeed's.
@pytest.mark.parametrize("layout,extra", [(Layout(1, 2, 1), []), (Layout(2, 1, 1), ["parallel.zero_stage=0"])],
                         ids=["pp2", "tp2-zero0"])
def test_a_spike_is_skipped_with_weights_unchanged(tmp_path, data_cache, layout, extra):
    run_processes(_spike_runs, layout, layout, data_cache, str(tmp_path), ["single"], extra)
    _assert_spike_skipped_exactly(tmp_path)


def test_killed_after_the_rollback_and_resumed_is_bitwise(tmp_path, data_cache):
    """bloom-train, one process, a checkpoint every iteration written in the background (so the
    save of iteration 8, made after the first spike, may be in flight when the rollback comes: it
    waits for it, then retires it). SIGKILLed right after the rollback (the resumed run starts
    from the checkpoint before the spikes, meets them again and rolls back the same way), then
    again while writing the checkpoint of iteration 11 (a save starts once the previous one is
    complete: the run resumes from 10, after the rollback, its skip range and detector window from
    that checkpoint): the steps equal an uninterrupted run's bitwise."""
    def args(run):
        return BASE + ROLLBACK + [f"trainer.run_dir={run}", f"data.cache_dir={data_cache}",
                                  "trainer.save_interval=1", "trainer.async_save=true"]
    whole = bloom_train(args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert "rolled back to" in whole.stdout and "iter_00000007" in whole.stdout.split("rolled back to")[1]
    run = tmp_path / "killed"
    for kill_when in ("rolled back to", "checkpoint of iteration 11"):  # the second: 10 is complete
        crashed = bloom_train(args(run), kill_when=kill_when)
        assert crashed.returncode != 0 and kill_when in crashed.stdout, crashed.stdout[-2000:]
    resumed = bloom_train(args(run))
    assert resumed.returncode == 0, resumed.stderr
    assert "iter_00000010" in resumed.stdout.split("resumed from")[1].splitlines()[0]
    expected, got = final_records(tmp_path / "whole"), final_records(run)
    assert sorted(got) == list(range(1, ITERS + 1)) and [s for s, r in got.items() if r["data_skipped"]] == [8, 9]
    assert got == expected
