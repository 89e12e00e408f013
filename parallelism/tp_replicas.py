"""Replicated parameters (LayerNorms, row-parallel biases) must stay identical on every TP rank.

Their gradients are computed from all-reduced activations, so in exact arithmetic the replicas
never drift; BigScience saw them drift under bf16 with non-deterministic kernels and had to re-sync
(--sync-tp-duplicated-parameters). We measure the drift and, when there is any, copy TP rank 0's
values to the others, so a drift is both visible in the metrics and stopped.
"""
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn


def replicated_parameters(module: nn.Module) -> list:
    """Parameters every TP rank holds whole (megatron marks the split ones tensor_model_parallel)."""
    return [p for p in module.parameters() if not getattr(p, "tensor_model_parallel", False)]


@torch.no_grad()
def sync_replicated_parameters(module: nn.Module) -> float:
    """Largest difference of any replicated parameter from TP rank 0's copy (0.0 when in sync);
    afterwards every rank holds rank 0's values."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return 0.0
    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    params = replicated_parameters(module)
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    reference = flat.clone()
    dist.broadcast(reference, src=src, group=group)
    drift = (flat - reference).abs().max() if flat.numel() else torch.zeros(())
    dist.all_reduce(drift, op=dist.ReduceOp.MAX, group=group)
    if drift.item() > 0:
        offset = 0
        for p in params:
            p.copy_(reference[offset: offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
    return drift.item()
