"""A BLOOM model plus a new language's tokens: the extended tokenizer (data/tokenizer_extend.py),
the embedding grown to match, written as a Hub directory to continue pretraining from.

BLOOM ties the LM head to the word embedding, so one matrix grows. Its rows:
    [0, old vocab)             copied: every old token keeps its vector, so on old text every
                               old token's logit is the original model's
    [old vocab, new vocab)     the new tokens: the mean of the old tokens' rows (a neutral start:
                               the new token is as likely as an average token, not an arbitrary
                               outlier), or N(0, init_std) with --init normal
    the rest, up to the rows   padding (the vocabulary rounded up to a multiple of
                               pad_vocab_to_multiple_of x TP, as training/model/shapes.py pads it):
                               old padding rows are kept as they were, new ones are zero
Only the embedding changes; config.json keeps every other field, with vocab_size = the rows.

MODEL is a Hub directory (what bloom-import reads) or one of our checkpoints, which is exported
first (bloom-export, fp32, self-checked). The output is what bloom-import turns into a checkpoint
that `bloom-train trainer.resume=...` continues; --checkpoint-out does that import directly.
"""
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from data.tokenizer import TokenizerInfo
from data.tokenizer_extend import extend_tokenizer
from training.config.schema import ModelConfig
from training.hf.export import DTYPES, export_checkpoint, write_weights
from training.hf.importer import (TOKENIZER_FILES, HFFormatError, check_shapes, import_hf, read_hf_config,
                                  read_hf_tensors, safetensors_files)
from training.model.param_table import iter_parameters
from training.model.shapes import padded_vocab_size

EMBEDDING = "word_embeddings.weight"
INITS = ("mean", "normal")
SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


@dataclass
class ExtendedModel:
    directory: Path
    old_vocab: int
    new_vocab: int
    old_rows: int
    new_rows: int
    checkpoint: Optional[Path] = None


def new_row_count(new_vocab: int, old_rows: int, tp: int, multiple: int) -> int:
    """The vocabulary padded as the training model pads it, never fewer rows than before (the old
    padding rows are part of the old model's softmax)."""
    cfg = ModelConfig(vocab_size=new_vocab, pad_vocab_to_multiple_of=multiple, padded_vocab_size=None)
    return max(old_rows, padded_vocab_size(cfg, tp))


def grow_embedding(old: torch.Tensor, old_vocab: int, new_vocab: int, rows: int, init: str,
                   std: float, seed: int = 0) -> torch.Tensor:
    """(rows, hidden): old rows copied, new token rows initialised, new padding rows zero."""
    if init not in INITS:
        raise ValueError(f"--init {init} is not one of {', '.join(INITS)}")
    grown = torch.zeros(rows, old.shape[1], dtype=torch.float32)
    grown[:old.shape[0]] = old
    count = new_vocab - old_vocab
    if init == "mean":
        grown[old_vocab:new_vocab] = old[:old_vocab].mean(dim=0)
    else:
        generator = torch.Generator().manual_seed(seed)
        grown[old_vocab:new_vocab] = torch.randn(count, old.shape[1], generator=generator) * std
    return grown


def source_dtype(files: list) -> str:
    """The dtype the source stores (the output keeps it, so copied rows stay bit for bit)."""
    with safe_open(str(files[0]), framework="pt") as f:
        key = next(iter(f.keys()))
        found = f.get_slice(key).get_dtype()
    return SAFETENSORS_DTYPES.get(found, "fp32")


def hub_source(model: Path, scratch: Path) -> Path:
    """MODEL as a Hub directory: itself, or our checkpoint exported into scratch."""
    if (model / "config.json").is_file():
        return model
    return export_checkpoint(model, scratch / "source", "fp32").directory


def tokenizer_source(hub: Path, tokenizer: Optional[Path]) -> Path:
    source = Path(tokenizer) if tokenizer is not None else hub
    if not (source / "tokenizer.json").is_file():
        raise HFFormatError(f"{source}: no tokenizer.json to extend (give --tokenizer DIR)")
    return source


def extend_model(model, sources: list, out, init: str = "mean", new_tokens: int = 2000, tp: int = 1,
                 pad_multiple: int = 128, seed: int = 0, tokenizer=None, min_frequency: int = 2,
                 init_std: Optional[float] = None, checkpoint_out=None) -> ExtendedModel:
    """Extend MODEL's tokenizer with `sources` (a tokenizer dir, or text) and its embedding to
    match; write the Hub directory `out` (complete or absent) and, if asked, its import."""
    model, out = Path(model), Path(out)
    if not model.exists():
        raise HFFormatError(f"{model}: no such file or directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFFormatError(f"{out} already exists and is not empty: remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        scratch = Path(scratch)
        hub = hub_source(model, scratch)
        hf = read_hf_config(hub)
        files = safetensors_files(hub)
        tensors = read_hf_tensors(files, hf["num_layers"])
        check_shapes(tensors, hf)
        old_tok = tokenizer_source(hub, tokenizer)
        old_vocab = TokenizerInfo(old_tok).vocab_size
        if old_vocab > hf["vocab_size"]:
            raise HFFormatError(f"the tokenizer in {old_tok} has {old_vocab} tokens but the model's "
                                f"embedding only {hf['vocab_size']} rows")
        extended = extend_tokenizer(old_tok, sources, scratch / "tokenizer", new_tokens, min_frequency)
        rows = new_row_count(extended.new_vocab, hf["vocab_size"], tp, pad_multiple)
        std = init_std if init_std is not None else hf["init_std"]
        tensors[EMBEDDING] = grow_embedding(tensors[EMBEDDING], old_vocab, extended.new_vocab, rows,
                                            init, std, seed)
        staging = scratch / "out"
        staging.mkdir()
        write_hub_dir(staging, hub, tensors, hf["num_layers"], rows, source_dtype(files), scratch / "tokenizer")
        record = {"model": str(model.resolve()), "sources": [str(s) for s in sources], "init": init,
                  "init_std": std if init == "normal" else None, "old_vocab_size": old_vocab,
                  "new_vocab_size": extended.new_vocab, "old_rows": hf["vocab_size"], "new_rows": rows,
                  "tokens_offered": extended.candidates}
        (staging / "extend_vocab.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    result = ExtendedModel(out, old_vocab, extended.new_vocab, hf["vocab_size"], rows)
    if checkpoint_out is not None:
        result.checkpoint = import_hf(out, checkpoint_out)
    return result


def write_hub_dir(staging: Path, hub: Path, tensors: dict, num_layers: int, rows: int, dtype: str,
                  tokenizer_dir: Path) -> None:
    """config.json (vocab_size = rows), weights in HF names (lm_head tied, not stored), the
    extended tokenizer, the source's generation config."""
    config = json.loads((hub / "config.json").read_text())
    config["vocab_size"] = rows
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    hf_names = {ours: hf for ours, hf, _, _ in iter_parameters(num_layers)}
    state = {hf_names[name]: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in tensors.items()}
    write_weights(staging, state, "2GB")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, staging / name)
    if (hub / "generation_config.json").is_file():
        shutil.copy2(hub / "generation_config.json", staging / "generation_config.json")
