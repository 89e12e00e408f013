"""What stops a run that cannot usefully go on."""
import numpy as np


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row); the message says why."""


class NonFiniteGuard:
    """Counts steps whose loss was not finite or whose gradients were (and so were skipped); stops
    the run after `limit` in a row, naming the iterations, so a diverged run does not burn its
    budget. An fp16 loss-scale overflow is the scaler doing its job and does not count."""

    def __init__(self, limit: int = 5):
        self.limit, self.in_a_row = limit, 0

    def update(self, iteration: int, loss: float, grad_norm: float, skipped: bool, overflow: bool = False):
        """The line to report for this step, or None when it was a normal step."""
        if overflow and np.isfinite(loss):
            return f"iteration {iteration}: fp16 overflow, step skipped, loss scale lowered"
        finite = np.isfinite(loss) and not skipped
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.limit:
            raise TrainingStopped(
                f"{self.in_a_row} non-finite steps in a row (iterations {iteration - self.in_a_row + 1}-"
                f"{iteration}): stopping; resume from the last checkpoint with a lower lr or skip this data range")
        if finite:
            return None
        return (f"iteration {iteration}: loss {loss}, grad norm {grad_norm}: step skipped, "
                "weights unchanged")
