"""Shared, session-cached inputs of the data tests (no tests here).

The tokenizer is trained once per test session (small vocab) and the shipped corpus is
preprocessed once; both under pytest's base temp dir, never in the repository.
"""
import functools
import json
from pathlib import Path

import pytest

from data.config import DataConfig, TokenizerConfig
from data.paths import SHIPPED_CORPUS
from data.preprocess_run import PreprocessOptions, preprocess
from data.tokenizer_train import train_tokenizer

VOCAB = 2000


@functools.lru_cache(maxsize=None)
def _tokenizer(base: str) -> Path:
    return train_tokenizer([SHIPPED_CORPUS], Path(base) / "tokenizer", vocab_size=VOCAB, alpha=0.3)


@functools.lru_cache(maxsize=None)
def _processed(base: str) -> Path:
    out = Path(base) / "processed"
    preprocess([SHIPPED_CORPUS], _tokenizer(base), out, PreprocessOptions(progress=False))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return _tokenizer(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory) -> Path:
    return _processed(str(tmp_path_factory.getbasetemp()))


def shipped_documents() -> dict[str, list[str]]:
    """lang -> texts of the shipped corpus, in file order, read independently of the pipeline."""
    docs: dict[str, list[str]] = {}
    for path in sorted(SHIPPED_CORPUS.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            docs.setdefault(record["lang"], []).append(record["text"])
    return docs


def demo_config(tokenizer_dir: Path, cache_dir: Path, **overrides) -> DataConfig:
    cfg = DataConfig(seq_length=64, cache_dir=str(cache_dir), split="80,10,10",
                     tokenizer=TokenizerConfig(path=str(tokenizer_dir)))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def process_group():
    """megatron-core's builder needs a process group: a world-size-1 gloo one for this module,
    destroyed afterwards so other test modules can create their own."""
    import torch.distributed as dist

    from data.distributed import ensure_process_group

    created = not dist.is_initialized()
    ensure_process_group()
    yield
    if created and dist.is_initialized():
        dist.destroy_process_group()
