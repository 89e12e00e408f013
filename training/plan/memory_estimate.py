"""Memory per GPU of a layout, stage by stage, before anything is allocated.

For each pipeline stage, with P = parameters this GPU holds (training/model/param_table.py, split by TP;
the first stage holds the word embedding, the last a tied copy of it and the final LayerNorm):

  weights     = P x 2 bytes (bf16/fp16) or 4 (fp32)                      / DP if ZeRO-3
  gradients   = P x 4 bytes for bf16 (fp32 accumulation, as BLOOM-176B) or fp32, 2 for fp16
                                                                          / DP if ZeRO >= 2
  optimizer   = P x (8 bytes Adam moments + 4 bytes fp32 master weights when training in 16 bits)
                                                                          / DP if ZeRO >= 1
  activations = in_flight x layers x per_layer  (+ one layer's full set when recomputing)
                (+ on the last stage, fp32 logits and their softmax: 2 x 4 x s x b x V/TP)
  overhead    = 2 GiB (CUDA context, NCCL buffers, allocator fragmentation)

per_layer, bytes for one micro-batch of b sequences of s tokens, hidden h, a heads, TP t, 16-bit
activations (Korthikanti et al. 2022, "Reducing Activation Recomputation", no sequence parallel):
  s*b*h*(10 + 24/t + 5*a*s/(h*t))      without recomputation
  2*s*b*h                              with full recomputation (only each block's input is kept)
doubled for fp32 activations. in_flight = micro-batches whose activations a stage holds at once
under 1F1B: min(pp - stage, micro-batches per step) (1 without pipelining).
"""
from dataclasses import asdict, dataclass
from typing import List

from parallelism.pipeline_partition import stage_layer_counts
from parallelism.topology import Layout
from training.config.schema import ModelConfig
from training.model.bloom import ffn_size, padded_vocab_size
from training.model.param_table import PARAMETERS, Part, Shape, shard_numel

GIB = 2 ** 30
OVERHEAD_GIB = 2.0
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GRAD_BYTES = {"fp32": 4, "bf16": 4, "fp16": 2}


@dataclass
class StageMemory:
    stage: int
    layers: int
    parameters: int  # on one GPU of this stage
    weights: float  # GiB
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    total: float

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def stage_parameters(cfg: ModelConfig, tp: int, layers: int, first: bool, last: bool) -> int:
    """Parameters one GPU of a stage holds: its share of each tensor in the table."""
    shape = Shape(cfg.hidden_size, ffn_size(cfg), padded_vocab_size(cfg, tp))
    total = 0
    for spec in PARAMETERS:
        count = shard_numel(spec, shape, tp)
        if spec.part is Part.BLOCK:
            total += layers * count
        elif spec.part is Part.EMBEDDING and (first or (last and spec.name == "word_embeddings.weight")):
            total += count
        elif spec.part is Part.FINAL and last:
            total += count
    return total


def _activation_bytes(cfg: ModelConfig, tp: int, seq: int, micro: int, precision: str) -> tuple:
    """(kept per layer per micro-batch, one layer's full working set) in bytes."""
    h, a = cfg.hidden_size, cfg.num_heads
    full = seq * micro * h * (10 + 24 / tp + 5 * a * seq / (h * tp))
    kept = 2 * seq * micro * h if cfg.activation_checkpointing else full
    scale = 2 if precision == "fp32" else 1
    return kept * scale, full * scale


def estimate(cfg: ModelConfig, layout: Layout, precision: str, zero_stage: int, seq: int,
             micro: int, micro_batches: int) -> List[StageMemory]:
    counts = stage_layer_counts(cfg.num_layers, layout.pp)
    kept, full = _activation_bytes(cfg, layout.tp, seq, micro, precision)
    optimizer_bytes = 8 + (4 if precision != "fp32" else 0)
    stages = []
    for stage, layers in enumerate(counts):
        first, last = stage == 0, stage == layout.pp - 1
        params = stage_parameters(cfg, layout.tp, layers, first, last)
        in_flight = min(layout.pp - stage, micro_batches)
        activations = in_flight * layers * kept + (full if cfg.activation_checkpointing else 0)
        if last:
            activations += 2 * 4 * seq * micro * padded_vocab_size(cfg, layout.tp) / layout.tp
        weights = params * WEIGHT_BYTES[precision] / (layout.dp if zero_stage >= 3 else 1)
        grads = params * GRAD_BYTES[precision] / (layout.dp if zero_stage >= 2 else 1)
        optim = params * optimizer_bytes / (layout.dp if zero_stage >= 1 else 1)
        parts = [weights / GIB, grads / GIB, optim / GIB, activations / GIB, OVERHEAD_GIB]
        stages.append(StageMemory(stage, layers, params, *parts, sum(parts)))
    return stages
