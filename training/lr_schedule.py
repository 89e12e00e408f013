"""BLOOM's learning rate: linear warmup, then cosine (or linear) decay to min_lr, by samples.

Megatron's AnnealingLR as BigScience ran it (--lr-warmup-samples, --lr-decay-samples,
--lr-decay-style cosine): the rate of the step that starts after `consumed` samples is
    consumed <= warmup:       lr * consumed / warmup
    consumed >  decay:        min_lr
    otherwise:                min_lr + (lr - min_lr) * f((consumed - warmup) / (decay - warmup))
with f(r) = (cos(pi r) + 1) / 2 for cosine, 1 - r for linear, 1 for constant. Like Megatron,
the very first step (consumed = 0) of a warmup runs at lr 0.
"""
import math

from training.config.schema import OptimConfig


def learning_rate(optim: OptimConfig, consumed_samples: int) -> float:
    warmup, decay = optim.warmup_samples, optim.decay_samples
    if warmup > 0 and consumed_samples <= warmup:
        return optim.lr * consumed_samples / warmup
    if optim.decay_style == "constant":
        return optim.lr
    if consumed_samples > decay:
        return optim.min_lr
    ratio = (consumed_samples - warmup) / max(decay - warmup, 1)
    if optim.decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        coeff = 1.0 - ratio
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)
