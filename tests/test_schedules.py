"""The LR schedule and the batch-size rampup follow BLOOM-176B's definitions (Megatron's
AnnealingLR by samples, --rampup-batch-size 192 16 9_765_625), checked at chosen sample counts
against values worked out by hand from those definitions."""
import math

import pytest

from data.batch_schedule import BatchSchedule
from training.config.loader import load_config
from training.lr_schedule import learning_rate

OPTIM = load_config(["experiment=bloom-176b"]).optim  # lr 6e-5 -> 6e-6, warmup 183_105, decay 200M


@pytest.mark.parametrize("samples,expected", [
    (0, 0.0),                                  # Megatron's first warmup step runs at lr 0
    (183_105 // 2, 6e-5 * (183_105 // 2) / 183_105),
    (183_105, 6e-5),                           # end of warmup: the peak
    ((183_105 + 200_000_000) // 2, None),      # half way through the cosine: (lr + min) / 2
    (200_000_000, 6e-6),                       # end of decay
    (220_000_000, 6e-6),                       # constant at min_lr afterwards
])
def test_bloom_176b_learning_rate(samples, expected):
    if expected is None:
        ratio = (samples - 183_105) / (200_000_000 - 183_105)
        expected = 6e-6 + (6e-5 - 6e-6) * 0.5 * (1 + math.cos(math.pi * ratio))
        assert expected == pytest.approx(3.3e-5, rel=1e-4)
    assert learning_rate(OPTIM, samples) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_linear_and_constant_styles():
    from dataclasses import replace

    linear = replace(OPTIM, decay_style="linear")
    mid = (183_105 + 200_000_000) / 2
    assert learning_rate(linear, mid) == pytest.approx((6e-5 + 6e-6) / 2, rel=1e-6)
    assert learning_rate(replace(OPTIM, decay_style="constant"), 10 ** 9) == 6e-5


def test_bloom_176b_batch_rampup():
    # 116 increments of 16 from 192 to 2048 over 9_765_625 samples: one every 84_186.4 samples.
    schedule = BatchSchedule(2048, 2, 8, (192, 16, 9_765_625))
    per_increment = 9_765_625 / ((2048 - 192) / 16)
    assert schedule.global_batch(0) == 192
    assert schedule.global_batch(int(per_increment)) == 192   # 84_186 < 84_186.4
    assert schedule.global_batch(int(per_increment) + 1) == 208
    assert schedule.global_batch(int(50 * per_increment) + 1) == 192 + 50 * 16
    assert schedule.global_batch(9_765_625) == 2048
    assert schedule.global_batch(10 ** 9) == 2048
    assert schedule.num_micro_batches(0) == 192 // (2 * 8)
