"""A Hugging Face BloomForCausalLM directory -> a checkpoint in our format (training/checkpoint/files.py).

The result is an iteration-0 checkpoint saved at TP=1 PP=1 DP=1: model weights (fp32, canonical
names), zeroed trainer state, no optimizer files (a resume starts a fresh optimizer), a config.yaml
with the model's shape so `bloom-train` can continue from it, and the tokenizer when there is one.

Only safetensors are read: a pickle (pytorch_model.bin) can run code when loaded, so a directory
with nothing else is refused. The vocabulary is kept exactly as HF stores it (BLOOM: 250880 rows,
already padded), recorded as model.padded_vocab_size: padding rows take part in the softmax, so
adding or dropping rows would change the model.
"""
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open

from data.tokenizer import TokenizerInfo
from training.checkpoint.files import finalize, iteration_dir, split_of, staging_dir, write_json
from training.checkpoint.fragments import MASTER, Fragment, fragment_file, write_fragments
from training.model.param_table import Shape, TIED_HF_NAMES, iter_parameters

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")
INDEX = "model.safetensors.index.json"


class HFFormatError(ValueError):
    """An HF directory that cannot be imported; the message is one line naming the file."""


# -- reading the HF directory ------------------------------------------------------------------

def read_hf_config(hf_dir: Path) -> dict:
    """BloomConfig's shape fields from config.json, under our ModelConfig names."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HFFormatError(f"{path}: not valid JSON ({error})") from None
    if raw.get("model_type", "bloom") != "bloom":
        raise HFFormatError(f"{path}: model_type is {raw['model_type']!r}, expected 'bloom'")
    if raw.get("apply_residual_connection_post_layernorm"):
        raise HFFormatError(f"{path}: apply_residual_connection_post_layernorm=true is not BLOOM's "
                            "pre-LayerNorm block, which the training model implements")
    try:
        hidden = raw.get("hidden_size", raw.get("n_embed"))
        return {
            "hidden_size": int(hidden),
            "num_layers": int(raw.get("n_layer", raw.get("num_hidden_layers"))),
            "num_heads": int(raw.get("n_head", raw.get("num_attention_heads"))),
            "vocab_size": int(raw["vocab_size"]),
            "layer_norm_epsilon": float(raw.get("layer_norm_epsilon", 1e-5)),
            "init_std": float(raw.get("initializer_range", 0.02)),
            "hidden_dropout": float(raw.get("hidden_dropout", 0.0)),
            "attention_dropout": float(raw.get("attention_dropout", 0.0)),
        }
    except (KeyError, TypeError, ValueError) as error:
        raise HFFormatError(f"{path}: missing or bad shape field ({error})") from None


def safetensors_files(hf_dir: Path) -> List[Path]:
    """The weight files: those the index names when sharded, else every *.safetensors."""
    index = hf_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as error:
            raise HFFormatError(f"{index}: unreadable index ({error})") from None
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HFFormatError(f"{index} names {missing[0]}, which is missing"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return files
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in hf_dir.glob(pattern)})
    if pickles:
        raise HFFormatError(f"{hf_dir} holds only {pickles[0]} (a pickle, which can run code when "
                            "loaded): bloom-import reads safetensors only; re-save the model with "
                            "save_pretrained(safe_serialization=True) where you trust it")
    raise HFFormatError(f"{hf_dir}: no *.safetensors weight files")


def read_hf_tensors(files: List[Path], num_layers: int) -> Dict[str, torch.Tensor]:
    """Canonical name -> fp32 tensor. Keys may carry the BloomForCausalLM prefix "transformer."
    or not (a bare BloomModel, as some released BLOOM files are)."""
    canonical = {hf: ours for ours, hf, _, _ in iter_parameters(num_layers)}
    tensors, lm_head = {}, None
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                hf_name = key if key.startswith("transformer.") or key in TIED_HF_NAMES else f"transformer.{key}"
                if hf_name in TIED_HF_NAMES:
                    lm_head = (key, path, f.get_tensor(key))
                elif hf_name in canonical:
                    tensors[canonical[hf_name]] = f.get_tensor(key).to(torch.float32)
                else:
                    raise HFFormatError(f"{path}: tensor {key} is not a BloomForCausalLM parameter")
    missing = [hf for hf, ours in canonical.items() if ours not in tensors]
    if missing:
        raise HFFormatError(f"{files[0].parent}: no tensor {missing[0]} in the safetensors files"
                            + (f" ({len(missing)} parameters missing)" if len(missing) > 1 else ""))
    if lm_head is not None:
        _check_tied(lm_head, tensors["word_embeddings.weight"])
    return tensors


def _check_tied(lm_head, embedding: torch.Tensor) -> None:
    key, path, tensor = lm_head
    if tensor.shape != embedding.shape or not torch.equal(tensor.to(torch.float32), embedding):
        raise HFFormatError(f"{path}: {key} differs from the word embedding; BLOOM ties them and so "
                            "does the training model")


def check_shapes(tensors: Dict[str, torch.Tensor], hf: dict) -> None:
    """Every tensor has the shape config.json implies (BLOOM's FFN is always 4 x hidden)."""
    if hf["hidden_size"] % hf["num_heads"]:
        raise HFFormatError(f"config.json: hidden_size {hf['hidden_size']} is not divisible by "
                            f"n_head {hf['num_heads']}")
    dims = Shape(hidden=hf["hidden_size"], ffn=4 * hf["hidden_size"], vocab=hf["vocab_size"])
    for name, hf_name, spec, _ in iter_parameters(hf["num_layers"]):
        want, got = spec.shape(dims), tuple(tensors[name].shape)
        if got != want:
            raise HFFormatError(
                f"{hf_name} has shape {got} but config.json (hidden_size {hf['hidden_size']}, "
                f"vocab_size {hf['vocab_size']}) implies {want}")


# -- writing the checkpoint --------------------------------------------------------------------

def _tokenizer_source(hf_dir: Path, tokenizer: Optional[Path]) -> Optional[Path]:
    if tokenizer is not None:
        if not (Path(tokenizer) / "tokenizer.json").is_file():
            raise HFFormatError(f"--tokenizer {tokenizer}: no tokenizer.json there")
        return Path(tokenizer)
    return hf_dir if (hf_dir / "tokenizer.json").is_file() else None


def copy_tokenizer(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def tokenizer_vocab(source: Optional[Path], rows: int) -> int:
    """The tokenizer's vocabulary (the model's vocab_size), or the rows when there is no tokenizer."""
    if source is None:
        return rows
    vocab = TokenizerInfo(source).vocab_size
    if vocab > rows:
        raise HFFormatError(f"the tokenizer in {source} has {vocab} tokens but the model's embedding "
                            f"only {rows} rows")
    return vocab


def model_shape(hf: dict, vocab: int) -> dict:
    """The manifest's model dict (the keys training/checkpoint/saved_model.py reads)."""
    return {"hidden_size": hf["hidden_size"], "num_layers": hf["num_layers"], "num_heads": hf["num_heads"],
            "vocab_size": vocab, "padded_vocab_size": hf["vocab_size"],
            "ffn_hidden_size": 4 * hf["hidden_size"], "layer_norm_epsilon": hf["layer_norm_epsilon"]}


def run_config_yaml(hf: dict, shape: dict, name: str, tokenizer_dir: Optional[Path]) -> str:
    """The resolved bloom-train config for continuing from the import: the demo defaults with
    this model's shape, BLOOM's 2048-token sequences, and the copied tokenizer."""
    from training.config.loader import to_yaml
    from training.plan.planner import load_planned_config

    overrides = [f"model.{key}={shape[key]}" for key in
                 ("hidden_size", "num_layers", "num_heads", "vocab_size", "padded_vocab_size",
                  "layer_norm_epsilon")]
    overrides += [f"model.{key}={hf[key]}" for key in ("init_std", "hidden_dropout", "attention_dropout")]
    overrides += ["data.seq_length=2048"]
    cfg = load_planned_config(overrides)
    cfg.model.name = name
    if tokenizer_dir is not None:
        cfg.data.tokenizer.path = str(tokenizer_dir)
    return to_yaml(cfg)


def import_hf(hf_dir, out, tokenizer=None) -> Path:
    """Import an HF BLOOM directory into the checkpoints directory `out`; returns the new
    checkpoint directory (<out>/iter_00000000, made visible atomically, `latest` pointing at it)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFFormatError(f"{hf_dir}: not a directory")
    hf = read_hf_config(hf_dir)
    tensors = read_hf_tensors(safetensors_files(hf_dir), hf["num_layers"])
    check_shapes(tensors, hf)
    source = _tokenizer_source(hf_dir, tokenizer)
    shape = model_shape(hf, tokenizer_vocab(source, hf["vocab_size"]))

    final = iteration_dir(Path(out), 0)
    if final.exists():
        raise HFFormatError(f"{final} already exists: remove it or choose another --out")
    staging = staging_dir(final)
    shutil.rmtree(staging, ignore_errors=True)
    write_fragments(staging / fragment_file("model", 0), [_whole(name, tensor) for name, tensor in tensors.items()])
    write_json(staging / "trainer_state.json", {"iteration": 0, "consumed_samples": 0, "consumed_tokens": 0})
    if source is not None:
        copy_tokenizer(source, staging / "tokenizer")
    config_yaml = run_config_yaml(hf, shape, f"imported-{hf_dir.resolve().name}",
                                  final.resolve() / "tokenizer" if source is not None else None)
    (staging / "config.yaml").write_text(config_yaml)
    finalize(staging, final, {"iteration": 0, "model": shape,
                              "saved_layout": {"tp": 1, "pp": 1, "dp": 1},
                              "imported_from": str(hf_dir.resolve())})
    return final


def _whole(name: str, tensor: torch.Tensor) -> tuple:
    """One whole tensor as the only fragment of its one TP shard (as a TP1 x DP1 run saves it)."""
    fragment = Fragment(name, MASTER, tuple(tensor.shape), split_of(name).dim, 0, 1, 0, tensor.numel())
    return fragment, tensor.float().reshape(-1)
