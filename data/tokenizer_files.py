"""The Hugging Face side files of a tokenizer directory (beside tokenizer.json).

`tokenizer_class: BloomTokenizerFast` makes transformers 4 load it with BLOOM's class and
transformers 5 with its fast tokenizers backend (5 maps that name to it). No bos/eos are added
on encode, as with BLOOM; decoding does not "clean up" spaces, so decode(encode(x)) == x.
"""
import json
from pathlib import Path

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def write_hf_files(directory: Path, model_max_length: int | None = None) -> None:
    config = {
        "tokenizer_class": "BloomTokenizerFast",
        **SPECIALS,
        "add_prefix_space": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(SPECIALS, indent=2) + "\n")
