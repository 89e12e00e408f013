"""The little torch.distributed the data pipeline needs: a group to exist, rank 0 to work first.

megatron-core's dataset builder calls barriers, so a single process gets a world-size-1 gloo
group (in-memory store, no port). Work done only on rank 0 (training a tokenizer,
preprocessing, building index caches) reports its error to every rank, so no rank waits
forever on a barrier that rank 0 will never reach.
"""
from typing import Callable, TypeVar

import torch.distributed as dist

from data.errors import DataError

T = TypeVar("T")


def ensure_process_group() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def on_rank0_then_all(work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only; every rank gets its result (or its error) afterwards.

    Any exception on rank 0 reaches the others as a DataError naming it (rank 0 raises its own),
    so no rank waits on a collective that rank 0 will never reach.
    """
    outcome, failure = [None, None], None
    if rank() == 0:
        try:
            outcome = [work(), None]
        except Exception as err:  # noqa: BLE001 - told to every rank, then raised here
            failure = err
            outcome = [None, str(err) if isinstance(err, DataError) else f"rank 0 failed: {type(err).__name__}: {err}"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise DataError(outcome[1])
    return outcome[0]


def all_ranks_agree(flag: bool) -> bool:
    """True only if `flag` holds on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    import torch

    value = torch.tensor([0 if flag else 1])
    dist.all_reduce(value)
    return int(value.item()) == 0
