"""Model FLOPs per iteration and TFLOPs per device, as Megatron-DeepSpeed reports them.

Megatron's formula (Narayanan et al. 2021; Megatron-DeepSpeed's `throughput_calculator`, which
produced BLOOM-176B's published 149-150 TFLOPs):

    F = 24 * c * B * s * L * h^2 * (1 + s/(6h) + V/(16*L*h))

where 24*B*s*L*h^2*(1 + s/(6h)) is one forward of the L transformer blocks (2 FLOPs per
multiply-add over QKV, scores, context, dense, h->4h, 4h->h) and c counts passes over them:
3 (forward + backward, backward being twice the forward) or 4 with full activation recompute
(the forward runs again in backward). These are hardware FLOPs, so recompute is counted.

The V term equals 6*B*s*h*V at c=4: the logits projection run forward and backward, never
recomputed. At c=3 Megatron's formula gives 4.5*B*s*h*V for it, three quarters of the true 6*B*s*h*V.
We keep the formula as Megatron has it, so our TFLOPs compare with BigScience's logs;
tests/test_metrics.py pins both facts against a count from the shapes.

Selective recomputation (model.recompute=selective) reruns only the attention core; like Megatron
we count it as c=3 (its extra 4*B*s^2*h per layer is left out), so only full recompute gives c=4.

BLOOM_FACTS.md writes the pass factor as "c = 4/3": read 4 with recompute, 3 without. Taken
as the number 4/3 it would give a third of the published 150 TFLOPs.
"""
from training.config.schema import ModelConfig
from training.model.shapes import ffn_size


def passes_over_blocks(recompute: bool) -> int:
    """Forward + backward (backward costs two forwards), plus one more forward when recomputing."""
    return 4 if recompute else 3


def model_flops_per_iteration(model_cfg: ModelConfig, padded_vocab: int, batch_size: int,
                              seq_length: int, recompute: bool) -> float:
    """Megatron's FLOPs for one iteration of `batch_size` sequences (the global batch).

    Megatron assumes an FFN of 4h; the 1/3 + f/(6h) below is its "1" written for any FFN width f,
    so BLOOM's shapes give exactly Megatron's number.
    """
    return megatron_flops(model_cfg.hidden_size, model_cfg.num_layers, seq_length, padded_vocab, batch_size,
                          ffn_size(model_cfg), passes_over_blocks(recompute))


def megatron_flops(h: int, L: int, s: int, V: int, B: int, f: int, passes: int) -> float:
    """The formula above for any GPT shape: hidden h, L layers, sequence s, padded vocab V, batch B,
    FFN width f, `passes` = 3 (no recompute) or 4 (full recompute)."""
    bracket = 1 / 3 + f / (6 * h) + s / (6 * h) + V / (16 * L * h)
    return 24.0 * passes * B * s * L * h * h * bracket


def tflops_per_device(flops: float, seconds: float, world_size: int) -> float:
    """Achieved TFLOP/s per device for `flops` done by `world_size` devices in `seconds`."""
    if seconds <= 0 or world_size <= 0:
        raise ValueError(f"tflops_per_device needs seconds > 0 and world_size > 0, "
                         f"got seconds={seconds}, world_size={world_size}")
    return flops / (seconds * world_size * 1e12)
