"""Reshaping: a checkpoint saved at TP2 x PP2 x DP2 (8 processes, ZeRO-1) continues at TP1 x PP1 x
DP2 and at TP2 x PP1 x DP1 with the losses of the unreshaped continuation, and one saved at
TP1 x PP1 x DP2 or at TP2 x PP1 x DP1 continues at TP2 x PP2 x DP2 likewise: weights and Adam moments are regathered
and resharded. Tolerance: relative 1e-4 per step (float reordering across layouts, as in
test_layout_parity.py; we see ~1e-7)."""
import json

import pytest
import torch.distributed as dist

from parallelism.topology import Layout
from tests.multiprocess import run_processes
from tests.train_steps import make_engine, train
from training.checkpoint import Checkpointer
from training.train import LoopState

SAVE_AT, CONTINUE = 3, 3
RTOL = 1e-4


def _overrides(layout: Layout, run_dir) -> list:
    return [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", "parallel.zero_stage=1",
            f"trainer.run_dir={run_dir}"]


def _dump(out, results) -> None:
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump([r["loss"] for r in results], f)


def _save_then_continue(rank, layout, run_dir, out):
    cfg, engine = make_engine(_overrides(layout, run_dir), layout)
    train(cfg, engine, layout, 0, SAVE_AT)
    gbs = cfg.trainer.global_batch_size
    Checkpointer(cfg, layout, engine).save(LoopState(SAVE_AT, SAVE_AT * gbs, SAVE_AT * gbs * 32))
    _dump(out, train(cfg, engine, layout, SAVE_AT, CONTINUE))


def _load_then_continue(rank, layout, checkpoint, run_dir, out):
    cfg, engine = make_engine(_overrides(layout, run_dir), layout)
    state = Checkpointer(cfg, layout, engine).load(checkpoint)
    assert state["iteration"] == SAVE_AT and not state["same_layout"]
    _dump(out, train(cfg, engine, layout, SAVE_AT, CONTINUE))


def _saved(tmp_path_factory, layout: Layout):
    run_dir = tmp_path_factory.mktemp(f"save-tp{layout.tp}pp{layout.pp}dp{layout.dp}")
    out = run_dir / "continued.json"
    run_processes(_save_then_continue, layout, layout, str(run_dir), str(out))
    return run_dir / "checkpoints" / f"iter_{SAVE_AT:08d}", json.loads(out.read_text())


@pytest.fixture(scope="module")
def saved_3d(tmp_path_factory):
    return _saved(tmp_path_factory, Layout(2, 2, 2))


@pytest.fixture(scope="module")
def saved_dp2(tmp_path_factory):
    return _saved(tmp_path_factory, Layout(1, 1, 2))


@pytest.fixture(scope="module")
def saved_tp2(tmp_path_factory):
    return _saved(tmp_path_factory, Layout(2, 1, 1))


def _check(tmp_path, saved, layout: Layout):
    checkpoint, expected = saved
    out = tmp_path / "reshaped.json"
    run_processes(_load_then_continue, layout, layout, str(checkpoint), str(tmp_path), str(out))
    got = json.loads(out.read_text())
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) / abs(b) < RTOL, f"step {SAVE_AT + step}: {a} vs unreshaped {b}"


@pytest.mark.parametrize("layout", [Layout(1, 1, 2), Layout(2, 1, 1)], ids=["tp1-pp1-dp2", "tp2-pp1-dp1"])
def test_3d_checkpoint_continues_at(tmp_path, saved_3d, layout):
    _check(tmp_path, saved_3d, layout)


@pytest.mark.parametrize("saved", ["saved_dp2", "saved_tp2"], ids=["from-tp1-pp1-dp2", "from-tp2-pp1-dp1"])
def test_checkpoint_continues_at_3d(tmp_path, request, saved):
    _check(tmp_path, request.getfixturevalue(saved), Layout(2, 2, 2))
