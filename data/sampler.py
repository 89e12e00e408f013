"""Which samples each data-parallel rank reads, step by step, resumable from consumed_samples.

Global batch k starts at c_k samples (c_0 = 0, c_{k+1} = c_k + gbs(c_k), gbs from the
BatchSchedule, rampup included) and is the contiguous sample range [c_k, c_k + gbs(c_k)),
whatever the DP size. Like Megatron's MegatronPretrainingSampler, it is read in micro-steps of
micro_batch_size * dp samples: in micro-step m, rank r reads
    c_k + m * mbs * dp + r * mbs  ...  + mbs - 1.
So the micro-batches of all ranks, interleaved rank by rank, are exactly the DP=1 sequence, and
resuming is starting at c = consumed_samples: no state but that one number.
"""
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from data.batch_schedule import BatchSchedule
from data.errors import DataError


class PretrainingSampler(Sampler):
    """Yields this rank's micro-batch index lists, from consumed_samples until the data runs out."""

    def __init__(self, total_samples: int, consumed_samples: int, schedule: BatchSchedule, dp_rank: int):
        if not 0 <= dp_rank < schedule.data_parallel_size:
            raise DataError(f"dp_rank {dp_rank} outside data-parallel size {schedule.data_parallel_size}")
        schedule.check_resume_point(consumed_samples)
        if consumed_samples > total_samples:
            raise DataError(f"consumed_samples={consumed_samples} is past the dataset's {total_samples} samples")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.schedule = schedule
        self.dp_rank = dp_rank

    def global_batches(self) -> Iterator[tuple[int, list[list[int]]]]:
        """(consumed_samples before the batch, this rank's micro-batches) for each global batch."""
        mbs, dp = self.schedule.micro_batch_size, self.schedule.data_parallel_size
        consumed = self.consumed_samples
        while True:
            size = self.schedule.global_batch(consumed)
            if consumed + size > self.total_samples:
                return  # an incomplete global batch is dropped, as in Megatron
            micro = []
            for step_start in range(consumed, consumed + size, mbs * dp):
                first = step_start + self.dp_rank * mbs
                micro.append(list(range(first, first + mbs)))
            yield consumed, micro
            consumed += size

    def __iter__(self) -> Iterator[list[int]]:
        for _, micro_batches in self.global_batches():
            yield from micro_batches

    def __len__(self) -> int:
        return sum(len(m) for _, m in self.global_batches())


def build_train_loader(dataset, schedule: BatchSchedule, consumed_samples: int, dp_rank: int,
                       num_workers: int = 0) -> DataLoader:
    """This rank's micro-batches, each a dict of [mbs, seq] tensors (tokens, labels, loss_mask, ...)."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, schedule, dp_rank)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False,
                      persistent_workers=num_workers > 0, generator=_own_generator())


def iter_global_batches(dataset, schedule: BatchSchedule, consumed_samples: int, dp_rank: int,
                        num_workers: int = 0) -> Iterator[tuple[int, list[dict]]]:
    """For each global step: (consumed_samples before it, this rank's list of micro-batches).

    The number of micro-batches follows the rampup: schedule.num_micro_batches(consumed).
    """
    loader = build_train_loader(dataset, schedule, consumed_samples, dp_rank, num_workers)
    sampler: PretrainingSampler = loader.batch_sampler
    batches = iter(loader)
    for consumed, micro_indices in sampler.global_batches():
        yield consumed, [next(batches) for _ in micro_indices]


class EvalSampler(Sampler):
    """Every sample of a validation set once, in order, split across ranks like the train sampler.

    The last micro-step is padded with None (megatron's GPTDataset returns a sample with a
    zero loss mask for it), so every rank runs the same number of steps and nothing is dropped.
    """

    def __init__(self, total_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total, self.mbs, self.rank, self.dp = total_samples, micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list]:
        step = self.mbs * self.dp
        for start in range(0, self.total, step):
            first = start + self.rank * self.mbs
            yield [i if i < self.total else None for i in range(first, first + self.mbs)]

    def __len__(self) -> int:
        return -(-self.total // (self.mbs * self.dp))


def build_eval_loader(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_sampler=EvalSampler(len(dataset), micro_batch_size, dp_rank, dp_size),
                      num_workers=num_workers, collate_fn=_collate_padded, generator=_own_generator())


def _own_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed when an iterator starts, from the global torch
    generator unless given one: a resumed run starts its iterator at another point of that stream
    than the uninterrupted run did, and every dropout mask after it would differ. Our samplers
    are deterministic, so the loader's own draws need not be random at all."""
    return torch.Generator().manual_seed(0)


def _collate_padded(samples: list[dict]) -> dict:
    """default_collate, minus the dataset_id a padding sample lacks."""
    keys = [k for k in samples[0] if all(k in s for s in samples)]
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}
