"""Loss and perplexity of a saved checkpoint at any TP x PP x DP layout, forward only.

Each pipeline stage builds only its own pieces from training/model/bloom.py (the word embedding and its
LayerNorm on the first stage, its blocks as parallelism/pipeline_partition.py splits them, the
final LayerNorm and the tied output on the last), under the canonical parameter names, and loads
its TP shard of each from the checkpoint. Activations go from stage to stage with blocking
send/recv, one batch at a time: with no backward pass there is nothing for a 1F1B schedule to
overlap, and no DeepSpeed engine (optimizer, ZeRO buffers) is needed to run a forward.
DP ranks take alternate batches. The last stage computes megatron-core's vocab-parallel cross
entropy per token; sums of losses and token counts are all-reduced over the whole job in fp64.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core import tensor_parallel as mtp
from torch import nn

from parallelism.pipeline_partition import stage_layer_counts
from parallelism.tensor_parallel import tensor_parallel_from_state
from training.config.schema import ModelConfig
from training.evaluation.eval_data import EvalSet, batches
from training.model.kernels import select_kernels
from training.model.bloom import make_block, make_word_embeddings, tied_logits
from training.checkpoint.files import split_of
from training.model.param_table import shard_tensor
from training.checkpoint.saved_model import read_model_tensors


class EvalLayoutError(ValueError):
    """The checkpoint's model cannot be laid out as asked; one line naming the value."""


@dataclass(frozen=True)
class Stage:
    index: int
    count: int
    blocks: range

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def this_stage(num_layers: int) -> Stage:
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    index = parallel_state.get_pipeline_model_parallel_rank()
    counts = stage_layer_counts(num_layers, pp)
    start = sum(counts[:index])
    return Stage(index, pp, range(start, start + counts[index]))


def check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """What must divide for the saved model to run at TP x PP (vocabulary rows kept exactly)."""
    for value, name in ((cfg.num_heads, "num_heads"), (cfg.ffn_hidden_size, "ffn_hidden_size"),
                        (cfg.padded_vocab_size, "padded vocabulary rows")):
        if value % tp:
            raise EvalLayoutError(f"parallel.tp={tp} does not divide the model's {name} ({value})")
    if cfg.num_layers < pp:
        raise EvalLayoutError(f"parallel.pp={pp} exceeds the model's {cfg.num_layers} layers")


class StageModel(nn.Module):
    """One pipeline stage of BloomModel; parameter names are the canonical ones (h.<i>.*)."""

    def __init__(self, cfg: ModelConfig, stage: Stage, device: torch.device):
        super().__init__()
        kernels = select_kernels(cfg.kernels, device, 0.0, cfg.hidden_size // cfg.num_heads)
        # Every weight is loaded right after: skip megatron's random initialisation.
        tp = tensor_parallel_from_state(0, device, initialize=False)
        self.stage = stage
        if stage.first or stage.last:  # the last stage's output layer is the tied embedding
            self.word_embeddings = make_word_embeddings(cfg, tp, 0)
        if stage.first:
            self.word_embeddings_layernorm = kernels.make_layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.h = nn.ModuleDict({str(i): make_block(cfg, tp, kernels, 0, i) for i in stage.blocks})
        if stage.last:
            self.ln_f = kernels.make_layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (first stage) or hidden states in; hidden states or vocab-parallel logits out."""
        if self.stage.first:
            x = self.word_embeddings_layernorm(self.word_embeddings(x))
        for block in self.h.values():
            x = block(x)
        if self.stage.last:
            x = tied_logits(self.ln_f(x), self.word_embeddings.weight)
        return x


def load_stage(model: StageModel, directory: Path, shape: dict) -> None:
    """This TP rank's shard of every parameter the stage holds, read from the checkpoint."""
    names = [name for name, _ in model.named_parameters()]
    tensors = read_model_tensors(directory, shape, names)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    shards = {name: shard_tensor(tensor, split_of(name), tp_rank, tp_size) for name, tensor in tensors.items()}
    # Not strict: megatron's layers add `_extra_state` entries (FP8 metadata), which hold no weights.
    result = model.load_state_dict(shards, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"stage weights do not match the model: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")


def build_stage(cfg: ModelConfig, directory: Path, shape: dict, device: torch.device) -> StageModel:
    model = StageModel(cfg, this_stage(cfg.num_layers), device).to(device)
    load_stage(model, directory, shape)
    return model.eval()


@torch.no_grad()
def _run_batch(model: StageModel, batch: List[List[int]], hidden_size: int, device) -> torch.Tensor:
    """This stage's part of one batch; on the last stage the fp64 sum of token losses."""
    stage = model.stage
    tokens = torch.tensor(batch, dtype=torch.long, device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if stage.first:
        x = inputs
    else:
        x = torch.empty(*inputs.shape, hidden_size, dtype=torch.float32, device=device)
        dist.recv(x, src=parallel_state.get_pipeline_model_parallel_prev_rank())
    out = model(x)
    if not stage.last:
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return torch.zeros((), dtype=torch.float64, device=device)
    losses = mtp.vocab_parallel_cross_entropy(out.float(), labels)
    return losses.double().sum()


def evaluate_sets(model: StageModel, sets: List[EvalSet], seq_length: int, batch_size: int,
                  hidden_size: int, device) -> Dict[str, dict]:
    """{set name: loss, perplexity, tokens, sequences, documents}, the same on every rank."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    sums = torch.zeros(len(sets), 2, dtype=torch.float64, device=device)
    counter = 0  # batches are dealt to DP ranks round-robin across all sets
    for index, eval_set in enumerate(sets):
        for batch in batches(eval_set.sequences(seq_length), batch_size):
            mine = counter % dp_size == dp_rank
            counter += 1
            if not mine:
                continue
            loss_sum = _run_batch(model, batch, hidden_size, device)
            if model.stage.last and parallel_state.get_tensor_model_parallel_rank() == 0:
                sums[index, 0] += loss_sum
                sums[index, 1] += sum(len(s) - 1 for s in batch)
    dist.all_reduce(sums)
    return {s.name: _summary(s, sums[i, 0].item(), int(sums[i, 1].item()), seq_length)
            for i, s in enumerate(sets)}


def _summary(eval_set: EvalSet, loss_sum: float, tokens: int, seq_length: int) -> dict:
    if tokens != eval_set.predicted_tokens:
        raise RuntimeError(f"{eval_set.name}: {tokens} tokens scored, {eval_set.predicted_tokens} expected")
    loss = loss_sum / tokens if tokens else None
    return {"loss": loss, "perplexity": math.exp(loss) if loss is not None and loss < 700 else None,
            "tokens": tokens, "sequences": len(eval_set.sequences(seq_length)),
            "documents": eval_set.documents}
