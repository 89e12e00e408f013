"""A saved checkpoint's model, as export and evaluation read it: which directory, which shape, which
tensors. Only the file format of training/checkpoint/files.py is used (never a running engine).
"""
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
from omegaconf import OmegaConf

from training.checkpoint.files import MANIFEST, CheckpointError, read_manifest, resolve_latest
from training.checkpoint.fragments import FragmentReader
from training.config.schema import ModelConfig
from training.model.param_table import Shape, iter_parameters

SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "vocab_size", "padded_vocab_size",
              "ffn_hidden_size", "layer_norm_epsilon")


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, given it or a checkpoints directory holding a `latest` pointer."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / MANIFEST).is_file():
        return path
    latest = resolve_latest(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint (no {MANIFEST}) nor a checkpoints "
                              "directory (no `latest` pointer)")
    if not (latest / MANIFEST).is_file():
        raise CheckpointError(f"{path}/latest points at {latest.name}, which is not a complete checkpoint")
    return latest


def saved_config(directory: Path) -> Optional[dict]:
    """The resolved run config saved with the checkpoint (config.yaml) as a plain dict, if any."""
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def model_shape(manifest: dict, directory: Path) -> dict:
    """The manifest's model shape, every key present (a missing one is a broken checkpoint)."""
    shape = manifest.get("model") or {}
    missing = [k for k in SHAPE_KEYS if k not in shape and k != "ffn_hidden_size"]
    if missing:
        raise CheckpointError(f"{directory}/{MANIFEST}: the model shape lacks {', '.join(missing)}")
    shape = dict(shape)
    shape["ffn_hidden_size"] = shape.get("ffn_hidden_size") or 4 * shape["hidden_size"]
    return shape


def model_config(shape: dict, kernels: str = "eager") -> ModelConfig:
    """The ModelConfig that rebuilds the saved model for inference: no dropout, the saved
    vocabulary rows exactly (padding rows take part in the softmax, so they are kept)."""
    return ModelConfig(hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
                       num_heads=shape["num_heads"], vocab_size=shape["vocab_size"],
                       padded_vocab_size=shape["padded_vocab_size"],
                       ffn_hidden_size=shape["ffn_hidden_size"],
                       layer_norm_epsilon=shape["layer_norm_epsilon"],
                       hidden_dropout=0.0, attention_dropout=0.0, kernels=kernels)


def expected_shapes(shape: dict) -> Dict[str, tuple]:
    """Canonical name -> the whole tensor's shape, from the param table."""
    dims = Shape(hidden=shape["hidden_size"], ffn=shape["ffn_hidden_size"], vocab=shape["padded_vocab_size"])
    return {name: spec.shape(dims) for name, _, spec, _ in iter_parameters(shape["num_layers"])}


def read_model_tensors(directory: Path, shape: dict, names: Iterable[str] = None) -> Dict[str, torch.Tensor]:
    """Whole tensors under canonical names (all by default), checked against the manifest's shape."""
    expected = expected_shapes(shape)
    names = list(expected) if names is None else list(names)
    reader = FragmentReader(directory, read_manifest(directory), "model")
    tensors = {name: reader.full(name) for name in names}
    reader.close()
    for name in names:
        if tuple(tensors[name].shape) != expected[name]:
            raise CheckpointError(f"{directory}: {name} has shape {tuple(tensors[name].shape)}, the "
                                  f"manifest's model shape says {expected[name]}")
    return tensors


def open_checkpoint(path) -> tuple:
    """(checkpoint directory, manifest, model shape) for a checkpoint or checkpoints directory."""
    directory = resolve_checkpoint(path)
    manifest = read_manifest(directory)
    return directory, manifest, model_shape(manifest, directory)
