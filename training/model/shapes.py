"""BLOOM's derived sizes, without torch: the planner, the memory estimate and config checks read
them before anything is built."""
from training.config.schema import ModelConfig


def padded_vocab_size(cfg: ModelConfig, tp: int) -> int:
    """The embedding's row count: the configured padded size, or the tokenizer vocabulary rounded
    up to a multiple of pad_vocab_to_multiple_of x TP (Megatron's rule; 250680 -> 250880)."""
    if cfg.padded_vocab_size is not None:
        return cfg.padded_vocab_size
    multiple = cfg.pad_vocab_to_multiple_of * tp
    return -(-cfg.vocab_size // multiple) * multiple


def ffn_size(cfg: ModelConfig) -> int:
    return cfg.ffn_hidden_size or 4 * cfg.hidden_size
