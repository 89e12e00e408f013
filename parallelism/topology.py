"""Process groups: torch.distributed and megatron-core's parallel_state, CPU (gloo) or GPU (nccl).

megatron-core's layers and its vocab-parallel cross entropy look their TP group up in
parallel_state, so it is initialised for every run, a single process included.
"""
import datetime
import os
import socket
from typing import List, Sequence

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from megatron.core import parallel_state

from parallelism.layout import Layout


DEFAULT_TIMEOUT_S = 600.0  # Megatron's --distributed-timeout-minutes default (parallel.collective_timeout_s)


def init_process_group(backend: str = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the job's process group from the launcher's environment (torchrun or srun), or form a
    one-process group when started alone. timeout_s bounds every collective of every group."""
    if dist.is_initialized():
        return
    if not timeout_s > 0:
        raise ValueError(f"collective timeout {timeout_s} s must be positive")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    default_group_timeout(timeout)
    if backend == "nccl":
        # Each rank on its own GPU before any collective (rank_hosts' all-gather included).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        # DeepSpeed insists on reading LOCAL_RANK itself. RANK and WORLD_SIZE stay unset: they
        # would tell a later bloom-train in this process that a launcher started it.
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def default_group_timeout(timeout: datetime.timedelta) -> None:
    """torch gives a group made without a timeout (DeepSpeed's pipeline and data-parallel groups
    are) its backend's default, 30 minutes for gloo, not the world group's: make that default
    ours, so a dead or stopped rank ends the job after the configured time in every group."""
    c10d.default_pg_timeout = timeout
    if isinstance(c10d.default_pg_nccl_timeout, datetime.timedelta):  # None without NCCL
        c10d.default_pg_nccl_timeout = timeout


def init_model_parallel(layout: Layout, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Build megatron-core's TP/PP/DP groups (ranks ordered TP fastest, then DP, then PP)."""
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"world size {dist.get_world_size()} != tp {layout.tp} x pp {layout.pp} x dp {layout.dp}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        distributed_timeout_minutes=timeout_s / 60,
    )


def rank_hosts() -> List[str]:
    """Every rank's hostname, in rank order (one all-gather, at start-up)."""
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts


def _span(values) -> str:
    """{0, 1, 2, 5} -> '0-2,5'"""
    values, runs = sorted(set(values)), []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def placement_lines(hosts: Sequence[str], layout: Layout) -> List[str]:
    """One line per host: its ranks and their pipeline stage, DP and TP coordinates (rank =
    tp + TP x (dp + DP x pp)); then a warning when a TP group spans hosts, because its all-reduces
    (two per layer, every micro-batch) would cross the network, not the node's own links."""
    by_host = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    lines = []
    for host, ranks in by_host.items():
        tp = [r % layout.tp for r in ranks]
        dp = [r // layout.tp % layout.dp for r in ranks]
        pp = [r // (layout.tp * layout.dp) for r in ranks]
        lines.append(f"host {host}: ranks {_span(ranks)} (pp {_span(pp)}, dp {_span(dp)}, tp {_span(tp)})")
    split = [start for start in range(0, len(hosts), layout.tp)
             if len(set(hosts[start:start + layout.tp])) > 1]
    if split:
        lines.append(f"warning: {len(split)} of {len(hosts) // layout.tp} TP groups span hosts (first: "
                     f"ranks {split[0]}-{split[0] + layout.tp - 1}); start a multiple of parallel.tp="
                     f"{layout.tp} processes per node so that TP stays inside a node")
    return lines


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
