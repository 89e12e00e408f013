"""BLOOM, Megatron-style: plain PyTorch modules on megatron-core's tensor-parallel layers.

Shapes are [batch, seq, hidden] throughout. Module attribute names are HF's BloomModel names, so
a parameter's name here is its HF name without the "transformer." prefix (training/model/param_table.py
holds the mapping and the TP split of each).

Each tensor-parallel rank holds:
- word_embeddings: its slice of the padded vocabulary (VocabParallelEmbedding);
- query_key_value / dense_h_to_4h: whole heads / a slice of the FFN (ColumnParallelLinear);
- dense / dense_4h_to_h: the matching input slice (RowParallelLinear, all-reduce after);
- every LayerNorm and the row-parallel biases whole.
The output layer is the word embedding itself (tied): logits are vocab-parallel and the loss is
a vocab-parallel cross entropy (training/model/vocab_loss.py: megatron's arithmetic, a chunk of tokens
at a time in fp32), so the full vocabulary is never gathered in training.

Under sequence parallelism (parallel.sequence_parallel) the blocks' LayerNorms, dropouts and residual
stream hold [batch, seq/TP, hidden]: gathered before the column-parallel matmuls, reduce-scattered
after the row-parallel ones (parallelism/sequence_parallel.py). model.recompute chooses what a block
recomputes in backward: nothing, the attention core (selective) or all of it (full).
"""
import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core import tensor_parallel as mtp
from megatron.core.utils import init_method_normal, scaled_init_method_normal
from torch import nn
from torch.utils.checkpoint import checkpoint

from parallelism.sequence_parallel import (gather_from_sequence, gathered_linear, reduce_scatter_to_sequence,
                                           scatter_to_sequence, sum_replicated_grads_over_tp)
from parallelism.tensor_parallel import TensorParallel, tensor_parallel_from_state
from training.model.alibi import alibi_slopes_for_rank
from training.config.schema import ModelConfig
from training.model.kernels import Kernels, select_kernels
from training.model.shapes import ffn_size, padded_vocab_size
from training.model.vocab_loss import chunked_vocab_parallel_cross_entropy


class BloomAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, kernels: Kernels):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads // tp.size
        self.head_dim = h // cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.kernels = kernels
        self.rng = tp.rng
        self.recompute_core = cfg.recompute == "selective"
        self.sequence_parallel = tp.sequence_parallel
        # A tuple, not a buffer: casting the module to bf16 must not round the slopes.
        self.slopes = tuple(alibi_slopes_for_rank(cfg.num_heads, tp.rank, tp.size).tolist())
        self.query_key_value = mtp.ColumnParallelLinear(
            h, 3 * h, config=tp.megatron_config, init_method=init_method_normal(cfg.init_std),
            bias=True, gather_output=False)
        self.dense = mtp.RowParallelLinear(
            h, h, config=tp.megatron_config,
            init_method=scaled_init_method_normal(cfg.init_std, cfg.num_layers),
            bias=True, input_is_parallel=True, skip_bias_add=True)

    def forward(self, x: torch.Tensor):
        """Returns the attention output before its bias, and the bias (added after dropout's input)."""
        qkv, _ = column_parallel(self.query_key_value, x, self.sequence_parallel)
        batch, seq, _ = qkv.shape  # the whole sequence, also under sequence parallelism
        # HF's layout: per head, q, k and v side by side.
        qkv = qkv.view(batch, seq, self.num_heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=x.device)
        dropout = self.dropout if self.training else 0.0
        if self.recompute_core and _recomputing(self):
            context = recomputed(self._core, self.rng, q, k, v, slopes, dropout)
        else:
            context = self._core(q, k, v, slopes, dropout)  # (B, heads/TP, T, head_dim)
        context = context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return row_parallel(self.dense, context, self.sequence_parallel)

    def _core(self, q, k, v, slopes, dropout):
        """Scores, softmax, attention dropout and the weighted sum: selective recompute's region."""
        with self.rng.fork():  # each rank's heads draw their own dropout mask
            return self.kernels.attention(q, k, v, slopes, dropout)


class BloomMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, kernels: Kernels):
        super().__init__()
        h, ffn = cfg.hidden_size, ffn_size(cfg)
        self.kernels = kernels
        self.sequence_parallel = tp.sequence_parallel
        self.dense_h_to_4h = mtp.ColumnParallelLinear(
            h, ffn, config=tp.megatron_config, init_method=init_method_normal(cfg.init_std),
            bias=True, gather_output=False, skip_bias_add=True)
        self.dense_4h_to_h = mtp.RowParallelLinear(
            ffn, h, config=tp.megatron_config,
            init_method=scaled_init_method_normal(cfg.init_std, cfg.num_layers),
            bias=True, input_is_parallel=True, skip_bias_add=True)

    def forward(self, x: torch.Tensor):
        intermediate, bias = column_parallel(self.dense_h_to_4h, x, self.sequence_parallel)
        return row_parallel(self.dense_4h_to_h, self.kernels.bias_gelu(intermediate, bias), self.sequence_parallel)


def column_parallel(layer: nn.Module, x: torch.Tensor, sequence_parallel: bool):
    """(output, bias) of a column-parallel layer, as megatron's forward returns them; under sequence
    parallelism its matmul runs on the whole sequence gathered from every rank's slice (megatron's
    own sequence-parallel path allocates its buffers on CUDA)."""
    if not sequence_parallel:
        return layer(x)
    bias = None if layer.skip_bias_add else layer.bias
    return gathered_linear(x, layer.weight, bias), (layer.bias if layer.skip_bias_add else None)


def row_parallel(layer: nn.Module, x: torch.Tensor, sequence_parallel: bool):
    """(output, bias) of a row-parallel layer: megatron's forward all-reduces the partial outputs;
    under sequence parallelism the same matmul's are reduce-scattered over the sequence instead
    (megatron's own sequence-parallel path allocates its buffers on CUDA)."""
    if not sequence_parallel:
        return layer(x)
    return reduce_scatter_to_sequence(torch.matmul(x, layer.weight.t())), layer.bias


class BloomBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, kernels: Kernels):
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.input_layernorm = kernels.make_layer_norm(cfg.hidden_size, eps)
        self.self_attention = BloomAttention(cfg, tp, kernels)
        self.post_attention_layernorm = kernels.make_layer_norm(cfg.hidden_size, eps)
        self.mlp = BloomMLP(cfg, tp, kernels)
        self.hidden_dropout = cfg.hidden_dropout
        self.rng = tp.rng
        self.recompute_all = cfg.recompute == "full"
        self.sequence_parallel = tp.sequence_parallel

    def _bias_dropout_add(self, out, bias, residual):
        with hidden_dropout_stream(self.rng, self.sequence_parallel):
            return residual + F.dropout(out + bias, p=self.hidden_dropout, training=self.training)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._bias_dropout_add(*self.self_attention(self.input_layernorm(x)), x)
        return self._bias_dropout_add(*self.mlp(self.post_attention_layernorm(x)), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_all and _recomputing(self):
            return recomputed(self._forward, self.rng, x)
        return self._forward(x)


def hidden_dropout_stream(rng, sequence_parallel: bool):
    """Where dropout outside the TP matmuls draws: without sequence parallelism every TP rank holds
    the same activations and must drop the same elements (the shared stream); with it each rank
    holds its own tokens and draws from its own TP stream, as Megatron does. The masks then differ
    from a run without sequence parallelism: with dropout on, the two runs are equal in distribution,
    not bitwise (the parity tests run with dropout 0)."""
    return rng.fork() if sequence_parallel else contextlib.nullcontext()




def _recomputing(module: nn.Module) -> bool:
    # Only a training forward that will run backward has activations worth dropping.
    return module.training and torch.is_grad_enabled()


def recomputed(fn, rng, *args):
    """fn(*args), keeping only `args` for backward: the backward reruns fn first, with both random
    streams rewound so that dropout draws the masks the forward drew."""
    contexts = functools.partial(_recompute_contexts, rng, rng.snapshot())
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def _recompute_contexts(rng, tp_state):
    # torch's checkpoint replays the default generator; the TP stream is ours to replay.
    return contextlib.nullcontext(), rng.replay_from(tp_state)


@contextlib.contextmanager
def seeded(seed: int, layer: int):
    """Initialise one layer from its own seed, leaving the caller's RNG stream untouched.

    Each layer's initial weights then depend on (seed, layer index) only: a pipeline stage that
    builds blocks 12-23 gets the same weights as a single process building all 24, and the tied
    embedding built on the first and the last stage is the same tensor.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + layer)
        yield


# Index of each piece in the layer sequence (the pipeline's LayerSpec order, the seeds).
EMBEDDING_LAYER, FIRST_BLOCK_LAYER = 0, 2


def make_word_embeddings(cfg: ModelConfig, tp: TensorParallel, seed: int) -> nn.Module:
    with seeded(seed, EMBEDDING_LAYER):
        return mtp.VocabParallelEmbedding(
            padded_vocab_size(cfg, tp.size), cfg.hidden_size,
            init_method=init_method_normal(cfg.init_std), config=tp.megatron_config)


def make_block(cfg: ModelConfig, tp: TensorParallel, kernels: Kernels, seed: int, index: int) -> "BloomBlock":
    with seeded(seed, FIRST_BLOCK_LAYER + index):
        return BloomBlock(cfg, tp, kernels)


def embedding_output(embedded: torch.Tensor, norm: nn.Module, dropout: float, training: bool,
                     tp: TensorParallel) -> torch.Tensor:
    """BLOOM's LayerNorm right after the word embedding, then embedding dropout (Megatron's); under
    sequence parallelism on this rank's slice of the sequence, where the blocks take it."""
    if tp.sequence_parallel:
        embedded = scatter_to_sequence(embedded)
    with hidden_dropout_stream(tp.rng, tp.sequence_parallel):
        return F.dropout(norm(embedded), p=dropout, training=training)


class EmbeddingLayerNorm(nn.Module):
    """The embedding's LayerNorm and dropout as a pipeline layer."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, tp: TensorParallel):
        super().__init__()
        self.norm = kernels.make_layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.dropout = cfg.hidden_dropout
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embedding_output(x, self.norm, self.dropout, self.training, self.tp)


class BloomModel(nn.Module):
    """The whole model in one process group stage (PP=1); the pipeline builds the same pieces."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, kernels: Kernels, seed: int):
        super().__init__()
        self.padded_vocab_size = padded_vocab_size(cfg, tp.size)
        self.word_embeddings = make_word_embeddings(cfg, tp, seed)
        self.word_embeddings_layernorm = kernels.make_layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.h = nn.ModuleList(make_block(cfg, tp, kernels, seed, i) for i in range(cfg.num_layers))
        self.ln_f = kernels.make_layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.embedding_dropout = cfg.hidden_dropout
        self.loss_chunk_tokens = cfg.loss_chunk_tokens
        self.tp = tp
        if tp.sequence_parallel:
            sum_replicated_grads_over_tp(self)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embedding_output(self.word_embeddings(tokens), self.word_embeddings_layernorm,
                                self.embedding_dropout, self.training, self.tp)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor = None, loss_mask: torch.Tensor = None):
        """tokens [batch, seq] -> this rank's slice of the logits [batch, seq, padded_vocab / TP],
        or, given labels, the mean loss (what a DeepSpeed engine calls)."""
        x = self.embed(tokens)
        for block in self.h:
            x = block(x)
        logits = tied_logits(self.ln_f(x), self.word_embeddings.weight, self.tp.sequence_parallel)
        if labels is None:
            return logits
        return language_model_loss(logits, labels, loss_mask, self.loss_chunk_tokens)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor = None):
        return self(tokens, labels, loss_mask)


def tied_logits(hidden: torch.Tensor, embedding_weight: torch.Tensor,
                sequence_parallel: bool = False) -> torch.Tensor:
    """Vocab-parallel logits from the tied embedding: identity forward, all-reduce of the input
    gradient backward (each rank's logits depend on the whole hidden state); under sequence
    parallelism the whole sequence is gathered first (and the gradient reduce-scattered)."""
    if sequence_parallel:
        hidden = gather_from_sequence(hidden)
    else:
        hidden = mtp.copy_to_tensor_model_parallel_region(hidden)
    return F.linear(hidden, embedding_weight)


def language_model_loss(parallel_logits, labels, loss_mask=None,
                        chunk_tokens: int = ModelConfig.loss_chunk_tokens) -> torch.Tensor:
    """Mean token cross entropy over the (masked) tokens, computed on vocab-parallel logits in fp32,
    `chunk_tokens` tokens at a time (model.loss_chunk_tokens).

    It consumes `parallel_logits`: its backward writes their gradient into them to save a
    logits-sized buffer, so a caller that needs the logits after backward passes a clone.
    """
    losses = chunked_vocab_parallel_cross_entropy(parallel_logits, labels, chunk_tokens)
    if loss_mask is None:
        return losses.mean()
    loss_mask = loss_mask.to(losses.dtype)
    return (losses * loss_mask).sum() / loss_mask.sum()


@torch.no_grad()
def gather_logits(parallel_logits: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary logits on every TP rank (evaluation, export checks, tests).

    Not megatron's gather_from_tensor_model_parallel_region: that one allocates on CUDA.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return parallel_logits
    pieces = [torch.empty_like(parallel_logits) for _ in range(size)]
    dist.all_gather(pieces, parallel_logits.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


def build_model(cfg: ModelConfig, *, seed: int, device="cpu", params_dtype=torch.float32,
                meta: bool = False, tp: TensorParallel = None) -> BloomModel:
    """This rank's BloomModel; megatron parallel_state must be initialised.

    meta=True builds it on the meta device: shapes and parameter counts with no memory (the plan).
    """
    device = torch.device(device)
    kernels = select_kernels(cfg.kernels, device, cfg.attention_dropout, cfg.hidden_size // cfg.num_heads)
    tp = tp or tensor_parallel_from_state(seed, device, params_dtype, initialize=not meta)
    if meta:
        with torch.device("meta"):
            return BloomModel(cfg, tp, kernels, seed)
    return BloomModel(cfg, tp, kernels, seed).to(device)
