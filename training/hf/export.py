"""A checkpoint (training/checkpoint/files.py, saved at any layout) -> a Hugging Face Hub directory.

    config.json                       BloomConfig (architectures: BloomForCausalLM)
    model-0000X-of-0000N.safetensors  HF names, the chosen dtype, lm_head left out (tied)
    model.safetensors.index.json      when sharded (a single file is model.safetensors, as HF does)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    generation_config.json            bos / eos / pad ids
    README.md                         the model card (training/hf/model_card.py)
    flax_model.msgpack                with --flax: the same weights for transformers 4.x's Flax BLOOM
                                      (training/hf/flax_export.py; sharded + index like HF's)

Vocabulary: config.json's vocab_size is the checkpoint's padded row count, every row exported.
Padding rows never receive a target but do take part in the softmax, so cutting them off would
change every probability; BLOOM's released models keep their padded 250880 rows the same way.

The checksums of the files it reads are verified first; the directory is written aside, self-checked
(training/hf/self_check.py) and then renamed into place, so `out` is complete or absent.
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from data.tokenizer import TokenizerInfo
from training.checkpoint.files import verify
from training.hf.convert import hf_from_shards
from training.hf.flax_export import write_flax_weights
from training.hf.importer import TOKENIZER_FILES
from training.hf.model_card import (blend_weights, final_losses, find_harness, find_metrics,
                                    read_trainer_state, render)
from training.checkpoint.saved_model import open_checkpoint, read_model_tensors, saved_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOOM_SPECIAL_IDS = {"unk_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
INDEX = "model.safetensors.index.json"


class ExportError(ValueError):
    """An export that cannot be made; the message is one line."""


@dataclass
class ExportResult:
    directory: Path
    checkpoint: Path
    iteration: int
    shards: int
    self_check: Optional[float]  # max abs logits difference, None when skipped


def special_token_ids(tokenizer_dir: Optional[Path]) -> Dict[str, int]:
    """BLOOM's ids (unk 0, bos 1, eos 2, pad 3), or where this tokenizer puts those tokens."""
    ids = dict(BLOOM_SPECIAL_IDS)
    if tokenizer_dir is None:
        return ids
    info = TokenizerInfo(tokenizer_dir)
    ids["eos_token_id"], ids["pad_token_id"] = info.eod, info.pad
    for key, token in (("unk_token_id", "<unk>"), ("bos_token_id", "<s>")):
        found = info.tokenizer.token_to_id(token)
        if found is not None:
            ids[key] = found
    return ids


def bloom_config(shape: dict, config: Optional[dict], dtype: str, ids: Dict[str, int]):
    from transformers import BloomConfig

    if shape["ffn_hidden_size"] != 4 * shape["hidden_size"]:
        raise ExportError(f"ffn_hidden_size {shape['ffn_hidden_size']} is not 4 x hidden_size: "
                          "BloomConfig has no field for another FFN size")
    model = (config or {}).get("model") or {}
    return BloomConfig(
        vocab_size=shape["padded_vocab_size"], hidden_size=shape["hidden_size"],
        n_layer=shape["num_layers"], n_head=shape["num_heads"],
        layer_norm_epsilon=shape["layer_norm_epsilon"],
        initializer_range=model.get("init_std", 0.02),
        hidden_dropout=model.get("hidden_dropout", 0.0),
        attention_dropout=model.get("attention_dropout", 0.0),
        architectures=["BloomForCausalLM"], dtype=str(DTYPES[dtype]).removeprefix("torch."),
        tie_word_embeddings=True, **ids)


def hf_state_dict(tensors: Dict[str, torch.Tensor], shape: dict, dtype: str) -> Dict[str, torch.Tensor]:
    """HF names -> tensors in the export dtype (every padded vocabulary row kept)."""
    full = hf_from_shards([tensors], shape["num_layers"], shape["padded_vocab_size"])
    state = {name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in full.items()}
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise ExportError(f"{name} does not fit in {dtype} (values overflow to inf): export bf16 or fp32")
    return state


def write_weights(directory: Path, state: Dict[str, torch.Tensor], max_shard_size) -> int:
    """HF's sharding convention: model.safetensors, or model-0000X-of-0000N.safetensors + index."""
    from huggingface_hub import split_torch_state_dict_into_shards

    try:
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
    except ValueError as error:
        raise ExportError(f"--max-shard-size {max_shard_size}: {error}") from None
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(split.filename_to_tensors)


def _size_in_bytes(size) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    return size if isinstance(size, int) else parse_size_to_int(size)


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _prepare_out(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty: remove it or choose another --out")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def export_checkpoint(checkpoint, out, dtype: str = "bf16", max_shard_size="2GB",
                      run_self_check: bool = True, flax: bool = False, harness=None) -> ExportResult:
    """Export `checkpoint` (a checkpoint dir, or a checkpoints dir with `latest`) to `out`; with
    `flax`, flax_model.msgpack too (the same tensors, in Flax's names and layout)."""
    from transformers import GenerationConfig

    from training.hf.self_check import self_check

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    directory, manifest, shape = open_checkpoint(checkpoint)
    # Checksums of every file the export reads, before it reads them. Optimizer and RNG files are
    # not exported; hashing Adam's moments would triple the time on a large checkpoint.
    verify(directory, [f for f in manifest["files"] if not f.startswith(("optim/", "rng/"))])
    config = saved_config(directory)
    tensors = read_model_tensors(directory, shape)
    tokenizer_dir = directory / "tokenizer" if (directory / "tokenizer" / "tokenizer.json").is_file() else None
    ids = special_token_ids(tokenizer_dir)

    out = Path(out)
    staging = _prepare_out(out)
    try:
        bloom_config(shape, config, dtype, ids).save_pretrained(str(staging))
        GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                         pad_token_id=ids["pad_token_id"]).save_pretrained(str(staging))
        state = hf_state_dict(tensors, shape, dtype)
        shards = write_weights(staging, state, max_shard_size)
        if flax:
            write_flax_weights(staging, state, _size_in_bytes(max_shard_size))
        del state
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, staging)
        diff = self_check(staging, tensors, shape, DTYPES[dtype]) if run_self_check else None
        state = read_trainer_state(directory)
        iteration = state.get("iteration", manifest.get("iteration", 0))
        metrics = find_metrics(directory)
        # An import nobody has trained yet carries bloom-train's default config for continuing:
        # its data and optimizer settings describe no training that happened.
        trained = config if (iteration > 0 or not manifest.get("imported_from")) else None
        weights, how = blend_weights(trained, TokenizerInfo(tokenizer_dir).fingerprint if tokenizer_dir else None)
        card = render(out.name, shape, manifest, state, trained, weights, how,
                      final_losses(metrics, iteration) if metrics else {},
                      {"dtype": dtype, "self_check": diff},
                      harness if harness is not None else find_harness(directory, iteration))
        (staging / "README.md").write_text(card)
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, directory, iteration, shards, diff)


def push_to_hub(directory: Path, repo: str, private: bool = False) -> str:
    """Upload an exported directory to the Hub (token from `huggingface-cli login` or HF_TOKEN)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo, repo_type="model",
                             commit_message=f"bloom-export of {directory.name}")
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"

