"""Memory per GPU of a layout, stage by stage, before anything is allocated.

For each pipeline stage, with P = parameters this GPU holds (training/model/param_table.py, split by TP;
the first stage holds the word embedding, the last a tied copy of it and the final LayerNorm):

  weights     = P x 2 bytes (bf16/fp16) or 4 (fp32)                      / DP if ZeRO-3
  gradients   = P x 4 bytes for bf16 (fp32 accumulation, as BLOOM-176B) or fp32, 2 for fp16
                                                                          / DP if ZeRO >= 2
                (+ P x 2 in bf16 at ZeRO-1: DeepSpeed's BF16_Optimizer keeps the 16-bit gradients
                 autograd writes until the step, besides its fp32 accumulation;
                 x 2 at ZeRO-2 when the gradients accumulate in the weights' own width (fp32,
                 fp16): stage_1_and_2 adds each micro-batch's partition into a second
                 partition-sized buffer (all_grad_tensors) besides the one it reduces into)
                + DeepSpeed's reduce buckets, held through backward (reduce_bucket_bytes): ZeRO 1-2
                  with contiguous_gradients keep reduce_bucket_size elements per bucket, allocated
                  whole whatever the model's size (5e8 by default: 1.9 GiB in fp32), one bucket,
                  two with overlap_comm, one more under pipelining (the pipeline engine's
                  reduce_gradients adds one, and moves the gradients into the buckets when they
                  fit in one: stage_gradient_bytes); ZeRO-3 one; BF16_Optimizer none
                (tests/test_memory_measured.py measures each at its peak: the storages of every
                 parameter's .grad and every gradient buffer of DeepSpeed's optimizer)
  optimizer   = P x (8 bytes Adam moments + 4 bytes fp32 master weights when training in 16 bits,
                       or at any ZeRO stage >= 1: DeepSpeed's ZeRO optimizer clones its fp32 partition)
                                                                          / DP if ZeRO >= 1
  activations = in_flight x layers x per_layer  (+ one layer's recomputed set while recomputing)
                (+ on the last stage, the logits s x b x V/TP at the activation width, whose
                 storage their gradient reuses, and one fp32 loss chunk: 4 x chunk x V/TP)
  overhead    = 2 GiB (CUDA context, NCCL buffers, allocator fragmentation)

per_layer, bytes one block keeps for backward for one micro-batch of b sequences of s tokens, hidden
h, a heads, TP t (Korthikanti et al. 2022, "Reducing Activation Recomputation", Table 2, no sequence
parallel), counted as values of the activations' width and dropout masks:
  none       values 4sbh (LayerNorm inputs x2, QKV and FFN inputs) + 12sbh/t (Q, K, V, attention
             output, GeLU input 4h/t, GeLU output 4h/t) + a*s*s*b/t (softmax output)
             (kept in fp32 by the eager softmax; in 16 bits also its cast copy: attention_core_bytes)
             + with attention dropout: a*s*s*b/t values (dropout output) and a*s*s*b/t mask
             + with hidden dropout: 2sbh mask (after attention and after the MLP)
  selective  none without the a*s*s*b terms (the attention core is recomputed in backward)
  full       values sbh (the block's input: the block is recomputed in backward)
With sequence parallelism (parallel.sequence_parallel) the sbh terms that TP does not split (4sbh
values, 2sbh mask, full's input) are split too: divided by t (the paper's sbh(34/t + 5as/(ht))).
Values take the activation width (2 bytes in 16 bits, 4 in fp32); a mask takes 1 byte on GPU (fused
dropout keeps a bool mask) and the value width on CPU (torch keeps a float mask there). In 16 bits
with both dropouts this is the paper's sbh(10 + 24/t + 5as/(ht)) and 2sbh with full recomputation.
Recomputing adds one layer's recomputed set while its backward runs (the whole block for full, the
a*s*s*b terms for selective). The s*s terms are kept only by attention that materialises its scores:
model.kernels=eager. The fused kernels (flex; SDPA's flash and memory-efficient kernels, which auto
picks on a GPU) keep none, dropout included (they keep its RNG state): the plan of a run with any
other backend counts no s*s terms, so there recompute none holds what selective does. Measured on an
H200 (README, bf16, seq 2048, flex): recompute none and selective peaked at the same memory
(19.8 / 45.9 / 74.4 GiB for bloom-560m / 1b7 / 3b), which the s*s terms had overestimated by 25-60%.
(On a CPU, SDPA with attention dropout falls back to its math kernel and keeps the scores; the
per-block test, tests/test_memory_measured.py, runs eager.)
in_flight = micro-batches whose activations a stage holds at once under 1F1B:
min(pp - stage, micro-batches per step) (1 without pipelining).
"""
from dataclasses import asdict, dataclass
from typing import List

from parallelism.pipeline_partition import stage_layer_counts
from parallelism.layout import Layout
from training.config.schema import ModelConfig
from training.model.shapes import ffn_size, padded_vocab_size
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


def per_layer_activation_bytes(cfg: ModelConfig, tp: int, seq: int, micro: int, recompute: str,
                               value_bytes: int, mask_bytes: int, sequence_parallel: bool = False) -> float:
    """Bytes one block keeps for backward (the table above) for one micro-batch."""
    sbh = seq * micro * cfg.hidden_size
    split = sbh / tp if sequence_parallel else sbh  # what a rank holds outside the TP matmuls
    if recompute == "full":
        return split * value_bytes
    hidden_masks = 2 * split if cfg.hidden_dropout > 0 else 0
    kept = (4 * split + 12 * sbh / tp) * value_bytes + hidden_masks * mask_bytes
    if recompute == "none":
        kept += attention_core_bytes(cfg, tp, seq, micro, value_bytes, mask_bytes)
    return kept


def attention_core_bytes(cfg: ModelConfig, tp: int, seq: int, micro: int, value_bytes: int,
                         mask_bytes: int) -> float:
    """The s*s activations of one block's attention core: softmax output, and with attention
    dropout its output and mask. Selective recomputation drops exactly these.

    The eager kernel (training/model/kernels.py attention_eager) runs the softmax in fp32 and its
    backward keeps that fp32 output; in 16 bits the probabilities are then cast to the value width
    and the context matmul keeps the cast copy too (4 + 2 bytes per score, not Korthikanti's 2:
    tests/test_memory_measured.py counted 1.23x the block's bytes with 2 at bf16, seq 128). In fp32
    the cast is the same tensor."""
    scores = cfg.num_heads * seq * seq * micro / tp
    softmax = 4
    if cfg.attention_dropout > 0:
        return scores * (softmax + value_bytes + mask_bytes)  # dropout's output feeds the matmul
    return scores * (softmax + (value_bytes if value_bytes != softmax else 0))


def _activation_bytes(cfg: ModelConfig, tp: int, seq: int, micro: int, precision: str, sp: bool) -> tuple:
    """(kept per layer per micro-batch, transient working set of one recomputed layer) in bytes, on GPU."""
    value = 4 if precision == "fp32" else 2
    # Without stored scores, "none" keeps what "selective" keeps, and selective recomputes nothing big.
    scores = cfg.kernels == "eager"
    recompute = cfg.recompute if scores or cfg.recompute == "full" else "selective"
    kept = per_layer_activation_bytes(cfg, tp, seq, micro, recompute, value, 1, sp)
    if cfg.recompute == "full":
        return kept, per_layer_activation_bytes(cfg, tp, seq, micro, "none" if scores else "selective",
                                                value, 1, sp)
    if cfg.recompute == "selective" and scores:
        return kept, attention_core_bytes(cfg, tp, seq, micro, value, 1)
    return kept, 0.0


def kept_logits_bytes(cfg: ModelConfig, tp: int, seq: int, micro: int, precision: str) -> float:
    """The logits the loss keeps for backward, one micro-batch on a last-stage rank (its V/TP slice)."""
    return seq * micro * padded_vocab_size(cfg, tp) / tp * WEIGHT_BYTES[precision]


def _logits_bytes(cfg: ModelConfig, tp: int, seq: int, micro: int, precision: str) -> float:
    """The last stage's logits and the loss's one fp32 chunk (training/model/vocab_loss.py)."""
    vocab = padded_vocab_size(cfg, tp) / tp
    chunk = min(cfg.loss_chunk_tokens, seq * micro) * vocab * 4
    return kept_logits_bytes(cfg, tp, seq, micro, precision) + chunk


def reduce_bucket_bytes(parallel, precision: str, zero_stage: int, pp: int) -> float:
    """DeepSpeed's gradient reduction buckets a rank holds through backward (the table above);
    `parallel` is the parallel config (reduce_bucket_size, overlap_comm, contiguous_gradients)."""
    if parallel is None or zero_stage == 0 or (zero_stage == 1 and precision == "bf16"):
        return 0.0  # ZeRO-0: the engine's own all-reduce; bf16 ZeRO-1: BF16_Optimizer, no buckets
    size = parallel.reduce_bucket_size
    if zero_stage == 3:
        return size * WEIGHT_BYTES[precision]
    if not parallel.contiguous_gradients:
        return 0.0
    overlap = parallel.overlap_comm if parallel.overlap_comm is not None else zero_stage >= 2
    buckets = 1 + int(bool(overlap)) + int(pp > 1)
    # ZeRO-1 stages its fp32 accumulator in the bucket; ZeRO-2 the gradients in their own width
    width = GRAD_BYTES[precision] if zero_stage == 1 else WEIGHT_BYTES[precision]
    return buckets * size * width


def gradient_bytes(params: int, layout: Layout, precision: str, zero_stage: int) -> float:
    """The gradients' own part of the table (buckets aside)."""
    grads = params * GRAD_BYTES[precision] / (layout.dp if zero_stage >= 2 else 1)
    if zero_stage == 1 and precision == "bf16":
        grads += params * WEIGHT_BYTES[precision]  # BF16_Optimizer keeps autograd's 16-bit grads too
    if zero_stage == 2 and GRAD_BYTES[precision] == WEIGHT_BYTES[precision]:
        grads *= 2  # stage_1_and_2's all_grad_tensors accumulate beside the reduced partition
    return grads


def in_flight(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once under 1F1B (1 without pipelining)."""
    return min(pp - stage, micro_batches)


def stage_gradient_bytes(params: int, layout: Layout, precision: str, zero_stage: int, parallel) -> float:
    """Gradients and reduce buckets at their peak. Under pipelining the engine's reduce_gradients
    adds its bucket and moves the gradients into the buckets (each .grad becomes a view of one)
    when they fit in one: the peak is then the larger of the gradients plus one bucket (just
    before) and the two buckets (after); otherwise the gradients stay beside both buckets."""
    own = gradient_bytes(params, layout, precision, zero_stage)
    buckets = reduce_bucket_bytes(parallel, precision, zero_stage, layout.pp)
    if layout.pp > 1 and buckets and params <= parallel.reduce_bucket_size:
        return max(own + buckets / 2, buckets)
    return own + buckets


def estimate(cfg: ModelConfig, layout: Layout, precision: str, zero_stage: int, seq: int,
             micro: int, micro_batches: int, sequence_parallel: bool = False, parallel=None) -> List[StageMemory]:
    """Each stage's memory (the table above); `parallel` (the parallel config) adds DeepSpeed's
    reduce buckets, sized by it."""
    counts = stage_layer_counts(cfg.num_layers, layout.pp)
    kept, recomputing = _activation_bytes(cfg, layout.tp, seq, micro, precision, sequence_parallel)
    # DeepSpeed's ZeRO optimizers (stages 1-3) always keep their own fp32 copy of the partition they
    # update, in fp32 training too (stage_1_and_2.py clones it; tests/test_memory_measured.py);
    # ZeRO-0 in fp32 updates the weights in place.
    optimizer_bytes = 8 + (4 if precision != "fp32" or zero_stage >= 1 else 0)
    stages = []
    for stage, layers in enumerate(counts):
        first, last = stage == 0, stage == layout.pp - 1
        params = stage_parameters(cfg, layout.tp, layers, first, last)
        held = in_flight(layout.pp, stage, micro_batches)
        activations = held * layers * kept + recomputing
        if last:
            activations += _logits_bytes(cfg, layout.tp, seq, micro, precision)
        weights = params * WEIGHT_BYTES[precision] / (layout.dp if zero_stage >= 3 else 1)
        grads = stage_gradient_bytes(params, layout, precision, zero_stage, parallel)
        optim = params * optimizer_bytes / (layout.dp if zero_stage >= 1 else 1)
        parts = [weights / GIB, grads / GIB, optim / GIB, activations / GIB, OVERHEAD_GIB]
        stages.append(StageMemory(stage, layers, params, *parts, sum(parts)))
    return stages
