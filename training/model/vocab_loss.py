"""Cross entropy on vocab-parallel logits, a chunk of tokens at a time, never a whole fp32 copy.

megatron-core's vocab_parallel_cross_entropy casts each rank's logits slice to fp32 and keeps that
copy (its softmax) for backward: at BLOOM's 250880-row vocabulary that is 1 MB per token at TP1,
2 GiB per sequence of 2048. Here the forward takes `chunk_tokens` rows at a time into fp32 and keeps
only each token's max and sum of exponentials; the backward recomputes each chunk's softmax from the
logits and writes the chunk's gradient over the logits themselves (the logits are consumed, as
megatron's in-place version consumes them). Extra memory: one fp32 chunk and two floats per token.

The arithmetic is megatron's, step for step (VocabParallelCrossEntropy's helpers), so the loss and
the gradient equal the unchunked ones; tests/test_vocab_loss.py holds them to that at TP1 and TP2.
"""
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as Megatron
from megatron.core.tensor_parallel.utils import VocabUtility


def _vocab_range(partition_size: int) -> tuple:
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    return VocabUtility.vocab_range_from_per_partition_vocab_size(partition_size, rank, size)


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _chunk_loss(logits: torch.Tensor, target: torch.Tensor, vocab_range: tuple):
    """(loss, max, sum of exp) per token of one chunk; logits (n, V/TP) are left untouched."""
    shifted = logits.to(torch.float32, copy=True)  # the one fp32 chunk
    logits_max = shifted.max(dim=-1)[0]
    _all_reduce(logits_max, dist.ReduceOp.MAX)
    _, _, predicted, sum_exp, _ = Megatron.calculate_predicted_logits(shifted, target, logits_max, *vocab_range)
    _all_reduce(predicted)
    _all_reduce(sum_exp)
    return torch.log(sum_exp) - predicted, logits_max, sum_exp


def _chunk_gradient(logits, target, logits_max, sum_exp, grad_loss, vocab_range) -> torch.Tensor:
    """d loss / d logits of one chunk in fp32: softmax minus the one-hot target, times grad_loss."""
    softmax = logits.to(torch.float32, copy=True)
    softmax -= logits_max.unsqueeze(-1)  # as calculate_predicted_logits does, without its collectives
    torch.exp(softmax, out=softmax)
    softmax.div_(sum_exp.unsqueeze(-1))
    target_mask = (target < vocab_range[0]) | (target >= vocab_range[1])
    masked_target = (target - vocab_range[0]).masked_fill(target_mask, 0)
    operands = Megatron.prepare_gradient_calculation_operands(softmax, target_mask)
    grad_2d, arange, update, grad = operands
    return Megatron.calculate_gradients(grad_2d, arange, masked_target, update, grad, grad_loss)


def _is_leaf_data(tensor: torch.Tensor) -> bool:
    """A leaf (a parameter, a tensor made by the caller), or a view of one: not ours to overwrite."""
    base = tensor._base if tensor._base is not None else tensor
    return base.grad_fn is None


def _chunks(rows: int, chunk_tokens: int):
    for start in range(0, rows, chunk_tokens):
        yield slice(start, min(start + chunk_tokens, rows))


class ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, chunk_tokens: int):
        """logits (N, V/TP) any float dtype, target (N,) -> loss per token (N,) fp32."""
        vocab_range = _vocab_range(logits.shape[-1])
        losses, maxes, sums = (torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
                               for _ in range(3))
        for rows in _chunks(logits.shape[0], chunk_tokens):
            losses[rows], maxes[rows], sums[rows] = _chunk_loss(logits[rows], target[rows], vocab_range)
        ctx.save_for_backward(logits, target, maxes, sums)
        ctx.chunk_tokens, ctx.vocab_range = chunk_tokens, vocab_range
        ctx.overwrite = not _is_leaf_data(logits)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        logits, target, maxes, sums = ctx.saved_tensors
        # Each chunk's gradient overwrites the chunk it was made from, unless that is a leaf's data.
        grad_logits = logits.detach() if ctx.overwrite else torch.empty_like(logits)
        for rows in _chunks(logits.shape[0], ctx.chunk_tokens):
            grad_logits[rows] = _chunk_gradient(logits[rows], target[rows], maxes[rows], sums[rows],
                                                grad_losses[rows], ctx.vocab_range)
        return grad_logits, None, None


def chunked_vocab_parallel_cross_entropy(parallel_logits: torch.Tensor, target: torch.Tensor,
                                         chunk_tokens: int) -> torch.Tensor:
    """Per-token losses, target's shape, like megatron's vocab_parallel_cross_entropy (and like it,
    consuming the logits: its backward writes their gradient into them)."""
    flat = parallel_logits.reshape(-1, parallel_logits.shape[-1])
    losses = ChunkedVocabParallelCrossEntropy.apply(flat, target.reshape(-1), chunk_tokens)
    return losses.view_as(target)
