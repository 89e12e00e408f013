"""BLOOM as a DeepSpeed PipelineModule: the same pieces as training/model/bloom.py, laid out as layers.

Layer sequence (index = LayerSpec position, also the per-layer init seed of training/model/bloom.py):
    0        word embedding (TiedLayerSpec "embed")
    1        embedding LayerNorm + embedding dropout
    2..L+1   BloomBlock 0..L-1
    L+2      final LayerNorm
    L+3      output logits through the tied embedding (TiedLayerSpec "embed", forward_fn)
and the loss (vocab-parallel cross entropy) on the last stage. Stages get blocks as
parallelism/pipeline_partition.py says (BigScience's 5/6.../6/5 split for 176B).
"""
import functools

from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from parallelism.pipeline_partition import stage_layer_counts
from parallelism.sequence_parallel import sum_replicated_grads_over_tp
from parallelism.tensor_parallel import TensorParallel
from training.config.schema import ModelConfig
from training.model.kernels import Kernels
from training.model.bloom import (FIRST_BLOCK_LAYER, BloomBlock, EmbeddingLayerNorm, language_model_loss,
                            make_word_embeddings, seeded, tied_logits)

TIED_KEY = "embed"


class WordEmbeddingPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int):
        super().__init__()
        self.word_embeddings = make_word_embeddings(cfg, tp, seed)
        self.sequence_parallel = tp.sequence_parallel

    def forward(self, tokens):
        return self.word_embeddings(tokens)


def output_logits(embedding: WordEmbeddingPipe, hidden):
    return tied_logits(hidden, embedding.word_embeddings.weight, embedding.sequence_parallel)


class BlockPipe(BloomBlock):
    """A BloomBlock initialised from its own seed, exactly as training.model.bloom.make_block builds it
    (LayerSpec needs a class, not a factory)."""

    def __init__(self, cfg, tp, kernels, seed, index):
        with seeded(seed, FIRST_BLOCK_LAYER + index):
            super().__init__(cfg, tp, kernels)


class FinalLayerNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels):
        super().__init__()
        self.norm = kernels.make_layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(self, x):
        return self.norm(x)


def pipeline_loss(parallel_logits, labels, chunk_tokens: int):
    """DeepSpeed hands the last stage the second element of each batch: (labels, loss_mask)."""
    target, loss_mask = labels
    return language_model_loss(parallel_logits, target, loss_mask, chunk_tokens)


class BloomPipeline(PipelineModule):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, kernels: Kernels, seed: int,
                 topology: PipeModelDataParallelTopology):
        self.stage_blocks = stage_layer_counts(cfg.num_layers, topology.get_dim("pipe"))
        layers = [
            TiedLayerSpec(TIED_KEY, WordEmbeddingPipe, cfg, tp, seed,
                          tied_weight_attr="word_embeddings.weight"),
            LayerSpec(EmbeddingLayerNorm, cfg, kernels, tp),
            *[LayerSpec(BlockPipe, cfg, tp, kernels, seed, i) for i in range(cfg.num_layers)],
            LayerSpec(FinalLayerNormPipe, cfg, kernels),
            TiedLayerSpec(TIED_KEY, WordEmbeddingPipe, cfg, tp, seed, forward_fn=output_logits,
                          tied_weight_attr="word_embeddings.weight"),
        ]
        loss_fn = functools.partial(pipeline_loss, chunk_tokens=cfg.loss_chunk_tokens)
        super().__init__(layers=layers, topology=topology, loss_fn=loss_fn,
                         partition_method="bloom", activation_checkpoint_interval=0)
        if tp.sequence_parallel:
            sum_replicated_grads_over_tp(self)

    def _partition_layers(self, method="bloom"):
        """Stage boundaries from stage_layer_counts: embedding + its LayerNorm on the first stage,
        final LayerNorm + tied output on the last, blocks in between as counted."""
        parts, position = [0], 2
        for count in self.stage_blocks[:-1]:
            position += count
            parts.append(position)
        parts.append(len(self._layer_specs))
        self.parts = parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=parts[stage], stop=parts[stage + 1])


def canonical_name(pipe_name: str, num_layers: int) -> str:
    """Our canonical (param_table) name of a PipelineModule parameter.

    DeepSpeed names a stage's parameters by layer index ("4.mlp.dense_h_to_4h.weight", "1.norm.bias")
    and the tied embedding "tied_modules.embed.word_embeddings.weight".
    """
    if pipe_name.startswith(f"tied_modules.{TIED_KEY}."):
        return pipe_name[len(f"tied_modules.{TIED_KEY}."):]
    index, rest = pipe_name.split(".", 1)
    index = int(index)
    if index == 1:
        return "word_embeddings_layernorm." + rest.removeprefix("norm.")
    if index == num_layers + 2:
        return "ln_f." + rest.removeprefix("norm.")
    return f"h.{index - FIRST_BLOCK_LAYER}.{rest}"
