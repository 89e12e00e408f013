"""Sequence parallelism (Korthikanti et al. 2022) over the TP group, on CPU (gloo) and GPU alike.

Outside the tensor-parallel matmuls (LayerNorms, dropouts, the residual stream) each TP rank holds
its own slice of the sequence instead of the whole of it: activations are [batch, seq/TP, hidden].
An all-gather before each column-parallel layer rebuilds the whole sequence (its backward is a
reduce-scatter; the layer keeps only the slice for backward and gathers it again there), and a reduce-scatter after each row-parallel layer replaces the all-reduce (its
backward is an all-gather). The TP-replicated parameters (LayerNorms, row-parallel biases) then see
only their rank's tokens, so their gradients are summed over TP.

megatron-core has these mappings too, but they allocate their buffers on "cuda"; these use
torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, which gloo has (torch 2.13).
Our activations are batch-first, so a collective runs on a seq-first copy ([seq, batch, hidden]:
ranks' slices are then contiguous blocks); with one sequence per micro-batch the copy is free.
"""
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

SEQ_DIM = 1


def _group():
    return parallel_state.get_tensor_model_parallel_group()


def _gather(x: torch.Tensor) -> torch.Tensor:
    """[b, s/t, h] on each rank -> [b, s, h], ranks' slices in rank order."""
    seq_first = x.transpose(0, SEQ_DIM).contiguous()
    size = dist.get_world_size(_group())
    out = torch.empty((size * seq_first.shape[0], *seq_first.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, seq_first, group=_group())
    return out.transpose(0, SEQ_DIM).contiguous()


def _reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    """[b, s, h] partial sums on each rank -> this rank's slice [b, s/t, h] of their sum."""
    seq_first = x.transpose(0, SEQ_DIM).contiguous()
    size = dist.get_world_size(_group())
    out = torch.empty((seq_first.shape[0] // size, *seq_first.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, seq_first, group=_group())
    return out.transpose(0, SEQ_DIM).contiguous()


def _split(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a tensor every TP rank holds whole."""
    rank = dist.get_rank(_group())
    return x.chunk(dist.get_world_size(_group()), dim=SEQ_DIM)[rank].contiguous()


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather(x)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad)


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad)


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad)


class _GatheredLinear(torch.autograd.Function):
    """gather(x) @ weight^T (+ bias), keeping for backward only this rank's slice x, gathered again
    there: megatron's linear under sequence parallelism, so that a column-parallel layer's input
    costs sbh/TP of activation memory, not sbh."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = torch.matmul(_gather(x), weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        whole = _gather(x).reshape(-1, x.shape[-1])
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = _reduce_scatter(grad.matmul(weight))
        grad_bias = grad_2d.sum(dim=0) if ctx.has_bias else None
        return grad_x, grad_2d.t().matmul(whole), grad_bias


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """A column-parallel layer's matmul on the whole sequence, from this rank's slice x."""
    return _GatheredLinear.apply(x, weight, bias)


def gather_from_sequence(x: torch.Tensor) -> torch.Tensor:
    """Before a column-parallel layer: the whole sequence from every rank's slice."""
    return _GatherFromSequence.apply(x)


def reduce_scatter_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """After a row-parallel layer: the sum over TP of its partial outputs, this rank's slice only."""
    return _ReduceScatterToSequence.apply(x)


def scatter_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """Into the sequence-parallel region from a tensor every rank holds whole (the embedding)."""
    return _ScatterToSequence.apply(x)


def sum_replicated_grads_over_tp(module: nn.Module) -> None:
    """Each TP-replicated parameter's gradient (LayerNorms, row-parallel biases: those megatron does
    not mark tensor_model_parallel) summed over TP as backward produces it: each rank saw only its
    slice of the sequence. A hook on the tensor runs before the gradient is accumulated, so DeepSpeed's
    own gradient hooks (ZeRO-2 buckets) and accumulation over micro-batches see the sum."""
    for param in module.parameters():
        if not getattr(param, "tensor_model_parallel", False):
            param.sequence_parallel = True  # megatron's mark for the same parameters
            param.register_hook(_all_reduce_over_tp)


def _all_reduce_over_tp(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()  # autograd may hand the same buffer to another consumer
    dist.all_reduce(grad, group=_group())
    return grad
