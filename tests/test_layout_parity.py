"""Loss parity across layouts: the same tiny model, seed and batches trained 5 steps in fp32 on CPU
at TP2, PP2, DP2 (ZeRO-1) and TP2 x PP2 x DP2 (8 processes) reports, step by step, the losses of
the single-process run (relative difference < 1e-4 each step; we see ~1e-7, float reordering)."""
import json

import pytest

from parallelism.topology import Layout
from tests.multiprocess import run_processes
from tests.train_steps import run_and_save

STEPS = 5
RTOL = 1e-4


def losses(tmp_path, layout: Layout, overrides=()) -> list:
    out = tmp_path / f"tp{layout.tp}-pp{layout.pp}-dp{layout.dp}.json"
    overrides = [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", "parallel.zero_stage=1",
                 *overrides]
    run_processes(run_and_save, layout, overrides, layout, STEPS, str(out))
    return [r["loss"] for r in json.loads(out.read_text())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return losses(tmp_path_factory.mktemp("ref"), Layout(1, 1, 1))


def test_reference_loss_falls(reference):
    assert reference[-1] < reference[0]


@pytest.mark.parametrize("layout", [Layout(2, 1, 1), Layout(1, 2, 1), Layout(1, 1, 2), Layout(2, 2, 2)],
                         ids=["tp2", "pp2", "dp2-zero1", "tp2-pp2-dp2"])
def test_layout_matches_single_process(tmp_path, reference, layout):
    got = losses(tmp_path, layout)
    for step, (a, b) in enumerate(zip(got, reference)):
        assert abs(a - b) / abs(b) < RTOL, f"step {step}: {a} vs single-process {b}"
