"""The model shape a checkpoint records, and the refusal to load one of another model."""
from pathlib import Path

from training.config.schema import ConfigError
from training.model.shapes import ffn_size, padded_vocab_size


def model_shape(cfg, tp: int) -> dict:
    m = cfg.model
    return {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
            "vocab_size": m.vocab_size, "padded_vocab_size": padded_vocab_size(m, tp),
            "ffn_hidden_size": ffn_size(m), "layer_norm_epsilon": m.layer_norm_epsilon}


def check_same_model(saved: dict, current: dict, directory: Path) -> None:
    """Refuse a checkpoint of another model. The padded vocabulary counts: its extra rows' logits
    enter the softmax, so a model with other padding is another function (pin
    model.padded_vocab_size, as BLOOM pins 250880, to move a checkpoint between TP sizes)."""
    for key in ("hidden_size", "num_layers", "num_heads", "vocab_size", "ffn_hidden_size"):
        if saved.get(key) != current[key]:
            raise ConfigError(
                f"checkpoint {directory} holds a model with {key}={saved.get(key)} but this config "
                f"builds {key}={current[key]}: the model shape cannot change on resume")
    rows = saved.get("padded_vocab_size")
    if rows is not None and rows != current["padded_vocab_size"]:
        raise ConfigError(
            f"checkpoint {directory} has {rows} vocabulary rows but this config builds "
            f"{current['padded_vocab_size']} (model.padded_vocab_size, or the vocabulary padded to a "
            f"multiple of 128 x TP): set model.padded_vocab_size={rows} to continue the same model")
