"""The global batch size at each point of training, with Megatron's batch-size rampup.

BLOOM's `--rampup-batch-size start incr samples` (Megatron's definition):
    num_increments        = (global_batch_size - start) / incr
    samples_per_increment = samples / num_increments
    gbs(consumed)         = min(global_batch_size, start + floor(consumed / samples_per_increment) * incr)
The batch that starts at `consumed` samples has gbs(consumed) samples, so the sequence of global
batches depends only on this schedule, never on the data-parallel size. This is the one place
that defines it: the sampler, the LR schedule and logging all ask this object.
"""
from dataclasses import dataclass

from data.errors import DataError


@dataclass(frozen=True)
class BatchSchedule:
    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int = 1
    rampup: tuple[int, int, int] | None = None  # (start, increment, ramp samples)

    def __post_init__(self) -> None:
        gbs, mbs, dp = self.global_batch_size, self.micro_batch_size, self.data_parallel_size
        if min(gbs, mbs, dp) < 1:
            raise DataError(f"batch sizes must be positive: global={gbs} micro={mbs} dp={dp}")
        for size in self.sizes():
            if size % (mbs * dp):
                raise DataError(f"global batch {size} is not a multiple of micro_batch_size*dp = {mbs}*{dp}")
        if self.rampup is not None:
            start, incr, samples = self.rampup
            if not (0 < start <= gbs) or incr < 1 or samples < 0:
                raise DataError(f"bad rampup (start, incr, samples) = {self.rampup} for global batch {gbs}")
            if (gbs - start) % incr:
                raise DataError(f"rampup: global_batch_size - start = {gbs - start} is not a multiple of incr={incr}")

    @property
    def _increments(self) -> int:
        if self.rampup is None:
            return 0
        start, incr, _ = self.rampup
        return (self.global_batch_size - start) // incr

    def global_batch(self, consumed_samples: int) -> int:
        """Size of the global batch that starts after `consumed_samples` samples."""
        if self._increments == 0 or self.rampup[2] == 0:
            return self.global_batch_size
        start, incr, samples = self.rampup
        # floor(consumed / (samples / n)) computed exactly in integers.
        steps = consumed_samples * self._increments // samples
        return min(self.global_batch_size, start + steps * incr)

    def num_micro_batches(self, consumed_samples: int) -> int:
        """Micro-batches each DP rank runs for the global batch that starts at consumed_samples."""
        return self.global_batch(consumed_samples) // (self.micro_batch_size * self.data_parallel_size)

    def sizes(self) -> list[int]:
        """Every distinct global batch size of the schedule, smallest first."""
        if self._increments == 0:
            return [self.global_batch_size]
        start, incr, _ = self.rampup
        return [start + i * incr for i in range(self._increments + 1)]

    def rampup_end(self) -> int:
        """Consumed samples at the first batch boundary where the full global batch applies."""
        consumed = 0
        while self.global_batch(consumed) < self.global_batch_size:
            consumed += self.global_batch(consumed)
        return consumed

    def is_boundary(self, consumed_samples: int) -> bool:
        """Whether a global batch starts exactly at consumed_samples (a valid resume point)."""
        end = self.rampup_end()
        if consumed_samples >= end:
            return (consumed_samples - end) % self.global_batch_size == 0
        consumed = 0
        while consumed < consumed_samples:
            consumed += self.global_batch(consumed)
        return consumed == consumed_samples

    def check_resume_point(self, consumed_samples: int) -> None:
        if consumed_samples < 0 or not self.is_boundary(consumed_samples):
            raise DataError(f"consumed_samples={consumed_samples} is not a global batch boundary of {self}")

    def steps_to(self, consumed_samples: int) -> int:
        """Iterations done when consumed_samples samples have been consumed (at a boundary)."""
        self.check_resume_point(consumed_samples)
        end = self.rampup_end()
        if consumed_samples >= end:
            return self.steps_to_rampup_end() + (consumed_samples - end) // self.global_batch_size
        steps = consumed = 0
        while consumed < consumed_samples:
            consumed += self.global_batch(consumed)
            steps += 1
        return steps

    def steps_to_rampup_end(self) -> int:
        steps = consumed = 0
        while self.global_batch(consumed) < self.global_batch_size:
            consumed += self.global_batch(consumed)
            steps += 1
        return steps
