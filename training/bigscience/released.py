"""What a Megatron-DeepSpeed mp_rank file says about the run: the model's shape, where training
stood (iteration, consumed samples and tokens), and the hyperparameters our config takes over.

Both importers read it: a global_stepN folder has these files, and ds_to_universal copies them
into the universal folder it writes.
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from training.bigscience import layout
from training.checkpoint.files import CheckpointError
from training.checkpoint.safe_unpickle import load


class BigScienceError(CheckpointError):
    """A BigScience checkpoint that cannot be imported; the message is one line."""


@dataclass
class Released:
    shape: dict  # the manifest's model dict (training/checkpoint/saved_model.py SHAPE_KEYS)
    hyper: dict  # init_std, hidden_dropout, attention_dropout
    iteration: int
    consumed_samples: int
    consumed_tokens: int
    precision: str
    tp: int
    pp: int


def model_states(directory: Path) -> list:
    """The mp_rank_XX_model_states.pt files, in mp_rank order."""
    found = sorted(Path(directory).glob("mp_rank_*_model_states.pt"))
    if not found:
        raise BigScienceError(f"{directory}: no mp_rank_XX_model_states.pt (not a Megatron-DeepSpeed checkpoint "
                           "folder, nor a universal one made by ds_to_universal)")
    return found


def read_released(path: Path, vocab: Optional[int] = None) -> Released:
    """The run described by one mp_rank file; `vocab` is the tokenizer's when one is given."""
    state = load(path)
    args = state.get("args") if isinstance(state, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise BigScienceError(f"{path}: no Megatron args in it (not a Megatron-DeepSpeed model-states file)")

    def need(key):
        value = getattr(args, key, None)
        if value is None:
            raise BigScienceError(f"{path}: Megatron's args lack {key}")
        return value

    hidden = int(need("hidden_size"))
    ffn = int(getattr(args, "ffn_hidden_size", None) or 4 * hidden)
    if ffn != 4 * hidden:
        raise BigScienceError(f"{path}: ffn_hidden_size {ffn} is not 4 x hidden_size {hidden} (BLOOM's MLP)")
    if getattr(args, "glu_activation", None):
        raise BigScienceError(f"{path}: glu_activation={args.glu_activation} is not BLOOM's GeLU MLP")
    rows = int(need("padded_vocab_size"))
    info = state.get(layout.UC_INFO) or {}
    vocab = vocab or getattr(args, "vocab_size", None) or info.get(layout.ORIGINAL_VOCAB_SIZE) or rows
    if vocab > rows:
        raise BigScienceError(f"{path}: a vocabulary of {vocab} tokens but only {rows} embedding rows")
    shape = {"hidden_size": hidden, "num_layers": int(need("num_layers")),
             "num_heads": int(need("num_attention_heads")), "vocab_size": int(vocab), "padded_vocab_size": rows,
             "ffn_hidden_size": ffn, "layer_norm_epsilon": float(getattr(args, "layernorm_epsilon", 1e-5))}
    if hidden % shape["num_heads"]:
        raise BigScienceError(f"{path}: hidden_size {hidden} is not divisible by {shape['num_heads']} heads")
    iteration = state.get("iteration", getattr(args, "iteration", None))
    if iteration is None:
        raise BigScienceError(f"{path}: no iteration recorded")
    tokens = state.get("tokens", getattr(args, "consumed_train_tokens", 0)) or 0
    hyper = {"init_std": float(getattr(args, "init_method_std", 0.02)),
             "hidden_dropout": float(getattr(args, "hidden_dropout", 0.1)),
             "attention_dropout": float(getattr(args, "attention_dropout", 0.1))}
    precision = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
    return Released(shape, hyper, int(iteration), int(getattr(args, "consumed_train_samples", 0) or 0),
                    int(tokens), precision, int(getattr(args, "tensor_model_parallel_size", 1)),
                    int(getattr(args, "pipeline_model_parallel_size", 1)))
