"""A BigScience checkpoint -> a checkpoint of ours that continues it: the fp32 masters, both Adam
moments, Adam's step count, the iteration and the consumed samples and tokens.

    import_released("universal", DIR, OUT)            DeepSpeed universal checkpoint (ds_to_universal)
    import_released("megatron-deepspeed", DIR, OUT)  a global_stepN folder

Like the HF importer (training/hf/importer.py), the result is saved at TP1 x PP1 x DP1 as whole
tensors, one fragment each, so any layout loads it; unlike it, with optim/ fragments and
optim/meta.json, and at the source's iteration. One file per Megatron-DeepSpeed pipeline layer
keeps the memory of an import to one layer (176B: the embedding, 14 GB per state).
"""
import shutil
from pathlib import Path
from typing import Optional

import torch

from training.bigscience.megatron_reader import MegatronSource
from training.bigscience.released import BigScienceError
from training.bigscience.universal_reader import UniversalSource
from training.checkpoint.files import finalize, iteration_dir, split_of, staging_dir, write_json
from training.checkpoint.fragments import MASTER, Fragment, write_fragments
from training.checkpoint.saved_model import expected_shapes
from training.hf.importer import copy_tokenizer, run_config_yaml, tokenizer_vocab
from training.model.param_table import megatron_deepspeed_names

SOURCES = {"universal": UniversalSource, "megatron-deepspeed": MegatronSource}
STATES = (MASTER, "exp_avg", "exp_avg_sq")


def import_released(kind: str, source_dir, out, tokenizer: Optional[Path] = None) -> Path:
    """Import into the checkpoints directory `out`; returns <out>/iter_<iteration> (made visible
    atomically, `latest` pointing at it)."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise BigScienceError(f"{source_dir}: not a directory")
    vocab = tokenizer_vocab(Path(tokenizer), 1 << 62) if tokenizer is not None else None
    source = SOURCES[kind](source_dir, vocab)
    released = source.released
    final = iteration_dir(Path(out), released.iteration)
    if final.exists():
        raise BigScienceError(f"{final} already exists: remove it or choose another --out")
    staging = staging_dir(final)
    shutil.rmtree(staging, ignore_errors=True)
    names = megatron_deepspeed_names(released.shape["num_layers"])
    expected = expected_shapes(released.shape)
    layers = sorted({n.layer for n in names})
    for index, layer in enumerate(layers):
        pieces = {state: [] for state in STATES}
        for n in (n for n in names if n.layer == layer):
            states = source.states(n)
            for state in STATES:
                _check_shape(source_dir, n, state, states[state], expected[n.name])
                pieces[state].append(_whole(n.name, state, states[state]))
        write_fragments(staging / f"model/rank{index:05d}.safetensors", pieces[MASTER])
        write_fragments(staging / f"optim/rank{index:05d}.safetensors", pieces["exp_avg"] + pieces["exp_avg_sq"])
    write_json(staging / "optim" / "meta.json", {"adam_step": source.adam_step(names[0]), "loss_scaler": {}})
    write_json(staging / "trainer_state.json", {"iteration": released.iteration, "consumed_samples":
                                                released.consumed_samples, "consumed_tokens": released.consumed_tokens,
                                                "spikes": {}})
    _write_config(staging, final, released, source_dir, tokenizer)
    finalize(staging, final, {"iteration": released.iteration, "model": released.shape,
                              "saved_layout": {"tp": 1, "pp": 1, "dp": 1}, "precision": released.precision,
                              "imported_from": f"{kind}:{source_dir.resolve()}"})
    return final


def _check_shape(source_dir: Path, n, state: str, tensor: torch.Tensor, want: tuple) -> None:
    if tuple(tensor.shape) != tuple(want):
        raise BigScienceError(f"{source_dir}: {n.optimizer} ({state}) has shape {tuple(tensor.shape)} but Megatron's "
                              f"args imply {tuple(want)}")


def _whole(name: str, state: str, tensor: torch.Tensor) -> tuple:
    """One whole tensor as the only fragment of its one TP shard (as a TP1 x DP1 run saves it)."""
    fragment = Fragment(name, state, tuple(tensor.shape), split_of(name).dim, 0, 1, 0, tensor.numel())
    return fragment, tensor.float().contiguous().reshape(-1)


def _write_config(staging: Path, final: Path, released, source_dir: Path, tokenizer) -> None:
    """config.yaml for `bloom-train trainer.resume=...` (the model's shape and BigScience's dropout
    and init std), and the tokenizer when one is given."""
    if tokenizer is not None:
        copy_tokenizer(Path(tokenizer), staging / "tokenizer")
    yaml = run_config_yaml({**released.shape, **released.hyper}, released.shape, f"bigscience-{source_dir.resolve().name}",
                           final.resolve() / "tokenizer" if tokenizer is not None else None)
    (staging / "config.yaml").write_text(yaml)
