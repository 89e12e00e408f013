"""The layout of a Megatron-DeepSpeed checkpoint as BigScience saved BLOOM (DeepSpeed's pipeline
engine with the BF16 optimizer), in one place for the exporter and the importers.

    global_stepN/layer_{layer:02d}-model_{tp:02d}-model_states.pt
        one pipeline layer's state dict (its TP shard), names local to the layer
    global_stepN/mp_rank_{pp * TP + tp:02d}_model_states.pt
        Megatron's args (argparse.Namespace), iteration, tokens, param_shapes (per param group:
        optimizer name -> TP shard shape), universal_checkpoint_info (how ds_to_universal merges
        TP slices), DeepSpeed's bookkeeping
    global_stepN/bf16_zero_pp_rank_{dp}_mp_rank_{pp * TP + tp:02d}_optim_states.pt
        {"optimizer_state_dict": {"single_partition_of_fp32_groups": [flat fp32 masters per group],
         "base_optimizer_state": {"state": {group: {"exp_avg", "exp_avg_sq", "step"}},
         "param_groups"}, "param_slice_mappings": [{optimizer name: fragment_address(numel,
         start)} per group], "group_paddings", "partition_count", ...}}

The mp_rank index is pipeline-major (DeepSpeed's ds_to_universal reads it so: pp0_tp0, pp0_tp1,
..., pp1_tp0). Names: training/model/param_table.py (megatron_deepspeed_names).
"""
import re

from training.model.param_table import Split, megatron_deepspeed_names

# deepspeed/checkpoint/constants.py: the universal-checkpoint info keys (spelled here so that
# reading a checkpoint imports no DeepSpeed code).
UC_INFO = "universal_checkpoint_info"
UC_VERSION = "universal_checkpoint_version"
ORIGINAL_VOCAB_SIZE = "original_vocab_size"
PADDED_VOCAB_SIZE = "padded_vocab_size"
VOCABULARY_PATTERNS = "vocabulary_parameter_patterns"
PIPELINE_REPLICATED_PATTERNS = "pipeline_replicated_parameter_patterns"
AVERAGE_PATTERNS = "parameter_to_average_patterns"
ROW_PARALLEL_PATTERNS = "parameter_with_row_parallelism_patterns"
PARALLEL_DIMS = "checkpoint_parallel_dimensions"

OPTIM_PREFIXES = ("bf16_zero_pp_rank_", "zero_pp_rank_")
STATES = ("fp32", "exp_avg", "exp_avg_sq")  # DeepSpeed's names; ours: master, exp_avg, exp_avg_sq


def mp_rank(pp: int, tp: int, tp_size: int) -> int:
    return pp * tp_size + tp


def layer_file(layer: int, tp: int) -> str:
    return f"layer_{layer:02d}-model_{tp:02d}-model_states.pt"


def model_states_file(mp: int) -> str:
    return f"mp_rank_{mp:02d}_model_states.pt"


def optim_file(dp: int, mp: int) -> str:
    return f"bf16_zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"


OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def stage_blocks(num_layers: int, pp: int) -> list:
    """[(first block, end)] per pipeline stage: contiguous, as even as possible, earlier stages
    taking the remainder (any contiguous split is a valid Megatron-DeepSpeed layout: the files
    name every parameter)."""
    base, extra = divmod(num_layers, pp)
    bounds, start = [], 0
    for stage in range(pp):
        end = start + base + (1 if stage < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _pattern(optimizer_name: str) -> str:
    """The regex naming a parameter in every block ("3.input_layernorm.weight" -> r"\\d+\\.input_...$")."""
    head, _, rest = optimizer_name.partition(".")
    return (r"\d+\." + re.escape(rest) if head.isdigit() else re.escape(optimizer_name)) + "$"


def universal_info(num_layers: int, vocab_rows: int, version: float) -> dict:
    """How ds_to_universal merges this model's TP slices: replicated parameters (LayerNorms, the
    row-parallel biases) averaged, as BigScience's drifted apart under bf16; row-parallel weights
    concatenated on dim 1; the rest on dim 0; the tied embedding read from the first stage only.
    original_vocab_size is the padded row count: the padding rows are trained parameters whose
    logits enter the softmax, so the universal checkpoint keeps them."""
    average, row = set(), set()
    for n in megatron_deepspeed_names(num_layers):
        if n.spec.split is Split.REPLICATED:
            average.add(_pattern(n.optimizer))
        elif n.spec.split is Split.ROW:
            row.add(_pattern(n.optimizer))
    return {UC_VERSION: version, ORIGINAL_VOCAB_SIZE: vocab_rows, PADDED_VOCAB_SIZE: vocab_rows,
            VOCABULARY_PATTERNS: [re.escape("tied_modules.embed.word_embeddings.weight") + "$"],
            PIPELINE_REPLICATED_PATTERNS: [re.escape("tied_modules.embed.")],
            AVERAGE_PATTERNS: sorted(average), ROW_PARALLEL_PATTERNS: sorted(row)}


def merge_tp(slices: list, split: Split):
    """The full tensor from its TP slices (in TP order) by ds_to_universal's rules."""
    import torch

    if split.dim is None:
        return slices[0] if len(slices) == 1 else sum(slices) / len(slices)
    return torch.cat(slices, dim=split.dim)
