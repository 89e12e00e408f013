"""Loss spikes, handled as BigScience did by hand on BLOOM-176B and PaLM did automatically.

SpikeDetector keeps a window of the last `trainer.spike.window` accepted steps' loss and gradient
norm. Once it holds `min_history` of them, a step whose loss (or gradient norm) exceeds the
window's mean by `loss_z` standard deviations AND by the factor `loss_ratio` (grad_norm_z,
grad_norm_ratio for the norm) is a spike: the engine skips its update (weights and optimizer
state unchanged; training/engine/engine.py asks `check` before the optimizer applies the
step), and it does not enter the window. `max_spikes` spikes within `rollback_window` iterations
ask for a rollback: the trainer reloads the last checkpoint saved before the first of them and
skips the iterations from that first spike to the last (BigScience's
--skip-train-iteration-range; SkipRanges, also set by hand).

Every rank feeds the detector the same numbers (the DP-reduced loss, the global gradient norm)
and the skip decision is agreed by one all-reduce, so every rank skips and rolls back together.
The detector's window and the skip ranges are saved in each checkpoint (state_dict), so a
resumed run decides exactly as the uninterrupted one would have.
"""
import math
from collections import deque
from typing import Iterable, List, Optional, Tuple

import numpy as np

from training.config.schema import ConfigError
from training.config.schema import SpikeConfig


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig):
        if cfg.window < 1 or not 1 <= cfg.min_history <= cfg.window:
            raise ConfigError(f"trainer.spike: need 1 <= min_history ({cfg.min_history}) <= window ({cfg.window})")
        self.cfg = cfg
        self.window: deque = deque(maxlen=cfg.window)  # (loss, grad_norm) of accepted steps
        self.spikes: List[int] = []  # iterations of the spikes inside the rollback window

    # -- the decision (pure: the state changes only in `record`) ------------------------------

    def check(self, loss: float, grad_norm: float) -> Optional[str]:
        """Why this step is a spike (a line), or None. Non-finite values are not spikes: the
        non-finite guard skips those steps (training/optimizer.py)."""
        if len(self.window) < self.cfg.min_history or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return None
        history = np.array(self.window, dtype=np.float64)
        c = self.cfg
        for name, value, column, z, ratio in (("loss", loss, 0, c.loss_z, c.loss_ratio),
                                              ("grad norm", grad_norm, 1, c.grad_norm_z, c.grad_norm_ratio)):
            mean, std = float(history[:, column].mean()), float(history[:, column].std())
            if _exceeds(value, mean, std, z, ratio):
                return (f"{name} {value:.4g} against the last {len(history)} steps' {mean:.4g} +- {std:.3g}"
                        f" (z {(value - mean) / std if std > 0 else math.inf:.1f}, x{value / mean:.2f})")
        return None

    # -- after the step -----------------------------------------------------------------------

    def record(self, iteration: int, loss: float, grad_norm: float, spike: bool, applied: bool) -> None:
        """After every rank agreed: a spike is remembered for the rollback count; a step whose
        update was applied enters the window (skipped ones, spikes or not, do not)."""
        if spike:
            self.spikes.append(iteration)
        elif applied and math.isfinite(loss) and math.isfinite(grad_norm):
            self.window.append((float(loss), float(grad_norm)))

    def rollback_range(self, iteration: int) -> Optional[Tuple[int, int]]:
        """(first spike, this iteration) when max_spikes spikes fell within the last
        rollback_window iterations; None otherwise (or when rollbacks are off: max_spikes 0)."""
        self.spikes = [i for i in self.spikes if i > iteration - self.cfg.rollback_window]
        if self.cfg.max_spikes > 0 and len(self.spikes) >= self.cfg.max_spikes:
            return self.spikes[0], iteration
        return None

    def state_dict(self) -> dict:
        return {"window": [list(pair) for pair in self.window], "spikes": list(self.spikes)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """A checkpoint's detector state; None (an older checkpoint): an empty window."""
        state = state or {}
        self.window = deque((tuple(pair) for pair in state.get("window", [])), maxlen=self.cfg.window)
        self.spikes = list(state.get("spikes", []))


def _exceeds(value: float, mean: float, std: float, z: Optional[float], ratio: Optional[float]) -> bool:
    """Every threshold that is set must be passed (and one at least must be set): the ratio keeps a
    window with almost no spread (a plateau) from calling noise a spike; the z-score keeps a noisy
    stretch from calling its own noise one."""
    if z is None and ratio is None:
        return False
    return (z is None or value > mean + z * std) and (ratio is None or value > ratio * mean)


class SkipRanges:
    """Inclusive ranges of iterations (1-based: iteration k is the k-th step, metrics.jsonl's step k)
    whose global batches are consumed without training: iteration and consumed_samples advance
    over them, so the data after a range is what the run would have read there anyway."""

    def __init__(self, ranges: Iterable[Tuple[int, int]] = ()):
        self.ranges: List[Tuple[int, int]] = []
        for start, end in ranges:
            self.add(start, end)

    @classmethod
    def parse(cls, items: Iterable) -> "SkipRanges":
        """trainer.skip_train_iteration_range: ["START-END", ...] (or "N" for one iteration)."""
        ranges = []
        for item in items:
            text = str(item).strip()
            start, dash, end = text.partition("-")
            try:
                bounds = int(start), int(end if dash else start)
            except ValueError:
                bounds = (0, -1)
            if not 1 <= bounds[0] <= bounds[1]:
                raise ConfigError(f"trainer.skip_train_iteration_range: {text!r} is not START-END "
                                  "(iterations counted from 1, START <= END), e.g. [\"1000-1100\"]")
            ranges.append(bounds)
        return cls(ranges)

    def add(self, start: int, end: int) -> None:
        """Add a range, merged with any it overlaps or touches."""
        merged = [(start, end)]
        for a, b in self.ranges:
            s, e = merged[0]
            if a <= e + 1 and s <= b + 1:
                merged[0] = (min(a, s), max(b, e))
            else:
                merged.append((a, b))
        self.ranges = sorted(merged)

    def end_of(self, iteration: int) -> Optional[int]:
        """The last iteration of the range holding `iteration`, or None."""
        for start, end in self.ranges:
            if start <= iteration <= end:
                return end
        return None

    def to_list(self) -> list:
        return [list(r) for r in self.ranges]
