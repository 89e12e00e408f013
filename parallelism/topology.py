"""Process groups: torch.distributed and megatron-core's parallel_state, CPU (gloo) or GPU (nccl).

megatron-core's layers and its vocab-parallel cross entropy look their TP group up in
parallel_state, so it is initialised for every run, a single process included.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def init_process_group(backend: str = None, timeout_minutes: float = 10.0) -> None:
    """Join the job's process group from the launcher's environment (torchrun or srun), or form a
    one-process group when started alone."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        # DeepSpeed insists on reading LOCAL_RANK itself. RANK and WORLD_SIZE stay unset: they
        # would tell a later bloom-train in this process that a launcher started it.
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def init_model_parallel(layout: Layout) -> None:
    """Build megatron-core's TP/PP/DP groups (ranks ordered TP fastest, then DP, then PP)."""
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"world size {dist.get_world_size()} != tp {layout.tp} x pp {layout.pp} x dp {layout.dp}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp
    )


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
