"""ALiBi: BLOOM's position information, a per-head linear bias on attention scores.

Slopes follow Press et al. (and HF's `build_alibi_tensor`): for a power-of-two head count n the
slopes are start^1 .. start^n with start = 2^(-8/n); otherwise the slopes of the closest smaller
power of two c, then every other slope of the 2c-head list for the remaining n - c heads.
"""
import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The slopes of all heads, fp32, in head order."""
    closest = 2 ** math.floor(math.log2(num_heads))
    start = 2.0 ** (-8.0 / closest)
    slopes = [start ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_start = 2.0 ** (-8.0 / (2 * closest))
        remaining = num_heads - closest
        slopes += [extra_start ** (i + 1) for i in range(0, 2 * remaining, 2)]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")  # also under a meta-device build


def alibi_slopes_for_rank(num_heads: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slopes of the heads a tensor-parallel rank owns: a contiguous block of heads, since
    the column-parallel QKV split hands each rank whole heads in order."""
    per_rank = num_heads // tp_size
    return alibi_slopes(num_heads)[tp_rank * per_rank:(tp_rank + 1) * per_rank]


def relative_alibi_bias(slopes: torch.Tensor, seq_len: int, device=None) -> torch.Tensor:
    """[heads, seq, seq] fp32 bias slope * (key - query).

    HF adds slope * key_position instead; under the causal mask the two differ by a constant per
    query row, which softmax removes. The relative form keeps the values that matter (keys near
    the query) small, so they survive a cast to bf16 where absolute positions near 2048 would be
    rounded to multiples of 8.
    """
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    distance = positions[None, :] - positions[:, None]
    return slopes.to(device)[:, None, None] * distance[None]
