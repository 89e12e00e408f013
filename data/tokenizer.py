"""Load a tokenizer directory (ours or the released BLOOM one) for preprocessing and datasets.

`TokenizerInfo` is also the tokenizer object megatron-core's dataset config wants: it needs
`unique_identifiers` (part of the index-cache key, so a different tokenizer never reuses
another's cached indices), `eod`, `pad` and `vocab_size`.
"""
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data.errors import DataError
from data.paths import resolve_path


def token_dtype(vocab_size: int):
    """The .bin token dtype megatron-core's GPTDatasetConfig expects for this vocab size."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


class TokenizerInfo:
    """A loaded tokenizer directory: the fast tokenizer plus what the dataset code needs to know."""

    def __init__(self, directory: str | Path):
        self.directory = resolve_path(directory)
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer directory has no tokenizer.json: {self.directory}")
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.tokenizer = Tokenizer.from_file(str(path))
        specials = self._special_tokens()
        self.eod = self._id_of(specials.get("eos_token", "</s>"))
        self.pad = self._id_of(specials.get("pad_token", "<pad>"))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.dtype = token_dtype(self.vocab_size)
        # What megatron-core hashes into its cache keys: the tokenizer's content, not its path.
        self.unique_identifiers = OrderedDict(
            [("class", "TokenizerInfo"), ("tokenizer_sha256", self.fingerprint), ("eod", self.eod)]
        )

    def _special_tokens(self) -> dict:
        config = self.directory / "tokenizer_config.json"
        if not config.is_file():
            return {}
        data = json.loads(config.read_text())
        # Special tokens may be plain strings or AddedToken dicts ({"content": ...}).
        return {k: (v["content"] if isinstance(v, dict) else v) for k, v in data.items()
                if k.endswith("_token") and isinstance(v, (str, dict))}

    def _id_of(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(f"tokenizer {self.directory} has no token {token!r}")
        return token_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (BLOOM adds none)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    # Megatron's tokenizer interface, for completeness of the object megatron-core holds.
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
