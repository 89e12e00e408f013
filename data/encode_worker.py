"""The per-chunk work of preprocessing, run in worker processes: parse, tokenize, append EOD.

A worker loads the tokenizer once (pool initializer) and keeps it in a module variable: that is
per-process state of the worker, not shared. Tokenization inside a worker is single-threaded;
the parallelism is one worker per core, as in Megatron's preprocess_data.
"""
import os
from dataclasses import dataclass, field

import numpy as np

from data.records import RecordKeys, parse_record
from data.tokenizer import TokenizerInfo

_WORKER: dict = {}


@dataclass
class Chunk:
    """Consecutive records of one source: (line number, raw record) pairs."""

    source_index: int
    default_group: str
    records: list


@dataclass
class ChunkResult:
    """Per output group: concatenated tokens (EOD after each document) and document lengths."""

    source_index: int
    tokens: dict = field(default_factory=dict)  # group -> np.ndarray
    lengths: dict = field(default_factory=dict)  # group -> np.ndarray[int32]
    skips: list = field(default_factory=list)  # (group, line number, kind)
    bytes_read: int = 0


def init_worker(tokenizer_dir: str, keys: RecordKeys, group_by: str, single_thread: bool) -> None:
    if single_thread:
        # One worker per core already: the tokenizer's own thread pool would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = TokenizerInfo(tokenizer_dir)
    _WORKER["keys"] = keys
    _WORKER["group_by"] = group_by


def encode_chunk(chunk: Chunk) -> ChunkResult:
    tok: TokenizerInfo = _WORKER["tokenizer"]
    keys, by_lang = _WORKER["keys"], _WORKER["group_by"] == "lang"
    result = ChunkResult(chunk.source_index)
    texts: dict[str, list[str]] = {}
    for lineno, raw in chunk.records:
        if isinstance(raw, bytes):
            result.bytes_read += len(raw)
        parsed = parse_record(raw, keys)
        if isinstance(parsed, str):
            result.skips.append((chunk.default_group, lineno, parsed))
            continue
        text, lang = parsed
        group = lang if (by_lang and lang) else chunk.default_group
        texts.setdefault(group, []).append(text)
    for group, group_texts in texts.items():
        result.tokens[group], result.lengths[group] = _encode_with_eod(tok, group_texts)
    return result


def _encode_with_eod(tok: TokenizerInfo, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = tok.encode_batch(texts)
    eod = [tok.eod]
    flat = [t for doc in ids for t in (doc + eod)]
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int32, count=len(ids))
    return np.array(flat, dtype=tok.dtype), lengths
