"""The one table of BLOOM's parameters: our name, Hugging Face's name, shape and tensor-parallel split.

Checkpoint reshaping, HF export and import, the memory plan and the universal-checkpoint info all
read this table; nothing else spells a parameter name or its split.

Splits (BLOOM_FACTS.md): COLUMN = dim 0 split (QKV and h->4h, weight and bias; whole heads per rank
because QKV is interleaved per head); ROW = dim 1 split (attention dense, 4h->h; their biases are
whole and added after the all-reduce); VOCAB = dim 0 split of the padded vocabulary;
REPLICATED = every TP rank holds the whole tensor and it must stay identical across ranks.
"""
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator, Tuple


class Split(Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"

    @property
    def dim(self):
        """The tensor dimension split across TP ranks, None when replicated."""
        return {Split.REPLICATED: None, Split.COLUMN: 0, Split.ROW: 1, Split.VOCAB: 0}[self]


class Part(Enum):
    """Where a parameter lives along the pipeline."""

    EMBEDDING = "embedding"  # first stage (and, tied, the last)
    BLOCK = "block"
    FINAL = "final"  # last stage


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    vocab: int  # padded


@dataclass(frozen=True)
class ParamSpec:
    name: str  # ours; "{i}" is the block index
    hf_name: str
    split: Split
    part: Part
    shape: Callable[[Shape], Tuple[int, ...]]
    # Its name inside its Megatron-DeepSpeed pipeline layer (BigScience's GPTModelPipe; see
    # megatron_deepspeed_names below for the layer index and the optimizer's name).
    mds_name: str = ""

    def at(self, block: int = None) -> Tuple[str, str]:
        """(our name, HF name) for one block (or the single instance outside blocks)."""
        return self.name.format(i=block), self.hf_name.format(i=block)


def _block(suffix: str, split: Split, shape) -> ParamSpec:
    return ParamSpec(f"h.{{i}}.{suffix}", f"transformer.h.{{i}}.{suffix}", split, Part.BLOCK, shape, suffix)


PARAMETERS = (
    ParamSpec("word_embeddings.weight", "transformer.word_embeddings.weight", Split.VOCAB,
              Part.EMBEDDING, lambda s: (s.vocab, s.hidden), "word_embeddings.weight"),
    ParamSpec("word_embeddings_layernorm.weight", "transformer.word_embeddings_layernorm.weight",
              Split.REPLICATED, Part.EMBEDDING, lambda s: (s.hidden,), "word_embeddings.norm.weight"),
    ParamSpec("word_embeddings_layernorm.bias", "transformer.word_embeddings_layernorm.bias",
              Split.REPLICATED, Part.EMBEDDING, lambda s: (s.hidden,), "word_embeddings.norm.bias"),
    _block("input_layernorm.weight", Split.REPLICATED, lambda s: (s.hidden,)),
    _block("input_layernorm.bias", Split.REPLICATED, lambda s: (s.hidden,)),
    _block("self_attention.query_key_value.weight", Split.COLUMN, lambda s: (3 * s.hidden, s.hidden)),
    _block("self_attention.query_key_value.bias", Split.COLUMN, lambda s: (3 * s.hidden,)),
    _block("self_attention.dense.weight", Split.ROW, lambda s: (s.hidden, s.hidden)),
    _block("self_attention.dense.bias", Split.REPLICATED, lambda s: (s.hidden,)),
    _block("post_attention_layernorm.weight", Split.REPLICATED, lambda s: (s.hidden,)),
    _block("post_attention_layernorm.bias", Split.REPLICATED, lambda s: (s.hidden,)),
    _block("mlp.dense_h_to_4h.weight", Split.COLUMN, lambda s: (s.ffn, s.hidden)),
    _block("mlp.dense_h_to_4h.bias", Split.COLUMN, lambda s: (s.ffn,)),
    _block("mlp.dense_4h_to_h.weight", Split.ROW, lambda s: (s.hidden, s.ffn)),
    _block("mlp.dense_4h_to_h.bias", Split.REPLICATED, lambda s: (s.hidden,)),
    ParamSpec("ln_f.weight", "transformer.ln_f.weight", Split.REPLICATED, Part.FINAL, lambda s: (s.hidden,),
              "weight"),
    ParamSpec("ln_f.bias", "transformer.ln_f.bias", Split.REPLICATED, Part.FINAL, lambda s: (s.hidden,), "bias"),
)

# HF's lm_head.weight is the word embedding itself (tied); exports write it once.
TIED_HF_NAMES = {"lm_head.weight": "transformer.word_embeddings.weight"}


def iter_parameters(num_layers: int) -> Iterator[Tuple[str, str, ParamSpec, int]]:
    """Every parameter of a model with `num_layers` blocks: (our name, HF name, spec, block or None)."""
    for spec in PARAMETERS:
        if spec.part is Part.BLOCK:
            for i in range(num_layers):
                yield (*spec.at(i), spec, i)
        else:
            yield (*spec.at(), spec, None)


# Megatron-DeepSpeed's GPTModelPipe, as BigScience trained BLOOM: pipeline layer 0 casts, 1 is the
# tied embedding (with its LayerNorm), 2 transposes, block i is layer 3 + i, L + 3 transposes back,
# L + 4 is the final LayerNorm and L + 5 the tied embedding again (the output projection). Its
# optimizer names the tied module's parameters "tied_modules.embed.<name>", the others
# "<layer>.<name>".
MDS_EMBEDDING_LAYER = 1
MDS_FIRST_BLOCK_LAYER = 3
MDS_TIED_PREFIX = "tied_modules.embed."


@dataclass(frozen=True)
class MdsName:
    name: str  # ours
    layer: int  # the pipeline layer (its layer_XX-model_YY-model_states.pt file)
    local: str  # the name inside that layer's state dict
    optimizer: str  # the name in the optimizer's param_slice_mappings and the universal checkpoint
    spec: ParamSpec


def mds_final_layer(num_layers: int) -> int:
    return num_layers + MDS_FIRST_BLOCK_LAYER + 1


def megatron_deepspeed_names(num_layers: int) -> list:
    """Every parameter under its Megatron-DeepSpeed names ([MdsName]), in pipeline layer order
    (within a layer, this table's order)."""
    names = []
    for name, _, spec, block in iter_parameters(num_layers):
        if spec.part is Part.EMBEDDING:
            names.append(MdsName(name, MDS_EMBEDDING_LAYER, spec.mds_name, MDS_TIED_PREFIX + spec.mds_name, spec))
        else:
            layer = MDS_FIRST_BLOCK_LAYER + block if spec.part is Part.BLOCK else mds_final_layer(num_layers)
            names.append(MdsName(name, layer, spec.mds_name, f"{layer}.{spec.mds_name}", spec))
    return sorted(names, key=lambda n: n.layer)


def numel(shape: Tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def shard_numel(spec: ParamSpec, shape: Shape, tp: int) -> int:
    """Elements one TP rank holds of this parameter."""
    full = numel(spec.shape(shape))
    return full if spec.split is Split.REPLICATED else full // tp


def resize_vocab_rows(tensor, padded_vocab: int):
    """Rows of a vocabulary tensor made `padded_vocab` long: zero rows appended, or padding rows
    dropped. Callers make sure dropped rows are padding (beyond the tokenizer's vocabulary)."""
    import torch

    rows = tensor.shape[0]
    if rows >= padded_vocab:
        return tensor[:padded_vocab]
    return torch.cat([tensor, tensor.new_zeros(padded_vocab - rows, *tensor.shape[1:])])


def shard_tensor(tensor, split: Split, tp_rank: int, tp_size: int, padded_vocab: int = None):
    """One TP rank's part of a whole tensor."""
    if split is Split.VOCAB and padded_vocab is not None:
        tensor = resize_vocab_rows(tensor, padded_vocab)
    if split.dim is None:
        return tensor
    return tensor.chunk(tp_size, dim=split.dim)[tp_rank]
