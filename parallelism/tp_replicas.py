"""Replicated parameters (LayerNorms, row-parallel biases) must stay identical on every TP rank.

Their gradients are computed from all-reduced activations, so in exact arithmetic the replicas
never drift; BigScience saw them drift under bf16 with non-deterministic kernels and had to re-sync
(--sync-tp-duplicated-parameters). We measure the drift and, when there is any, copy TP rank 0's
values to the others, so a drift is both visible in the metrics and stopped.

Under ZeRO the optimizer's fp32 master copy is the truth: it overwrites the model's weights after
every step. So the masters are measured and repaired too, or a repair would be undone at the next
step (DeepSpeed's hp mapping gives each parameter's whole master over the DP group).
"""
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from megatron.core import parallel_state
from torch import nn


def replicated_parameters(module: nn.Module) -> list:
    """Parameters every TP rank holds whole (megatron marks the split ones tensor_model_parallel)."""
    return [p for p in module.parameters() if not getattr(p, "tensor_model_parallel", False)]


def _has_masters(params: list) -> bool:
    """DeepSpeed's ZeRO optimizer links each parameter to its fp32 master partition (stages 1-2:
    `_hp_mapping`; stage 3: `ds_id`, and it keeps small parameters such as these whole)."""
    return bool(params) and (hasattr(params[0], "_hp_mapping") or hasattr(params[0], "ds_id"))


@torch.no_grad()
def sync_replicated_parameters(module: nn.Module) -> float:
    """Largest difference of any replicated parameter (weight or ZeRO fp32 master) from TP rank
    0's copy (0.0 when in sync); afterwards every rank holds rank 0's values in both.
    Under ZeRO every rank of the DP group must call it (reading the masters is a DP collective)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return 0.0
    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    params = replicated_parameters(module)
    masters = [safe_get_full_fp32_param(p) for p in params] if _has_masters(params) else []
    flat = torch.cat([t.detach().reshape(-1).float() for t in params + masters])
    reference = flat.clone()
    dist.broadcast(reference, src=src, group=group)
    drift = (flat - reference).abs().max() if flat.numel() else torch.zeros(())
    dist.all_reduce(drift, op=dist.ReduceOp.MAX, group=group)
    if drift.item() > 0:
        values = _unflatten(reference, params + masters)
        for p, value in zip(params, values[:len(params)]):
            p.copy_(value.to(p.dtype))
        for p, value in zip(params, values[len(params):]):
            safe_set_full_fp32_param(p, value)
    return drift.item()


def _unflatten(flat: torch.Tensor, like: list) -> list:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
    return out
