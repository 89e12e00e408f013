"""Typed data configuration: the `data` group of the root Hydra structured config.

Relative paths are resolved by data.paths.resolve_path (cwd first, then the project root), so
the shipped corpus `data/corpora` works from any directory.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class TokenizerConfig:
    # An existing tokenizer directory (ours or the released BLOOM one). None: train one on the
    # corpus into <cache_dir>/tokenizer-<key> (reused while corpus and settings are unchanged).
    path: Optional[str] = None
    vocab_size: int = 8000
    alpha: float = 0.3  # per-language smoothing of the training sample (BLOOM: 0.3-0.5)
    sample_bytes: Optional[int] = None  # size of the re-weighted sample; None: the corpus size
    min_frequency: int = 2
    seed: int = 42


@dataclass
class DatasetSpec:
    """One blend component: a preprocessed language/source, or any existing .bin/.idx prefix."""

    name: str = "???"
    prefix: Optional[str] = None  # None: <processed dir>/<name>
    weight: Optional[float] = None  # None for all: weights from token counts, alpha-smoothed


@dataclass
class DataConfig:
    seq_length: int = 2048
    # Raw corpus to preprocess (JSONL files/folders, compressed or not, or HF dataset dirs).
    # Empty: only `blend` prefixes are used and nothing is preprocessed.
    corpus: List[str] = field(default_factory=lambda: ["data/corpora"])
    text_key: str = "text"
    lang_key: str = "lang"
    group_by: str = "lang"  # one indexed dataset per "lang" field value, or per "source" file
    cache_dir: str = "data_cache"  # tokenizer, .bin/.idx and index caches live here
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Empty: every preprocessed dataset. Weights: all given (explicit) or none (from tokens).
    blend: List[DatasetSpec] = field(default_factory=list)
    alpha: float = 0.3  # smoothing of token-count weights: p_i^alpha / sum_j p_j^alpha; 1 = raw
    split: str = "969,30,1"  # train,valid,test per mille of each dataset's documents
    seed: int = 1234
    per_language_valid: bool = True  # also one validation set per dataset (per-language loss)
    eod_mask_loss: bool = False
    preprocess_workers: Optional[int] = None  # None: one worker process per core; 1: in-process
    strict: bool = False  # refuse bad corpus lines instead of skipping them
    loader_workers: int = 0  # torch DataLoader workers per rank
    # Explicit weights per dataset name, merged into `blend` (handy on the command line:
    # data.weights.en=0.3); ignored when empty.
    weights: Dict[str, float] = field(default_factory=dict)
