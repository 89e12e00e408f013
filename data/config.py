"""Typed data configuration: the `data` group of the root Hydra structured config.

Relative paths are resolved by data.paths.resolve_path (cwd first, then the project root), so
the shipped corpus `data/corpora` works from any directory.
"""
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

# -- allowed values, declared beside each field ------------------------------------------------
# `size: int = field(default=8, metadata=at_least(1))`: the field owns its range (or choices, or
# rule), and training/config/checks.py's check_declared walks the whole config before anything
# starts and refuses any other value in one line, "KEY=VALUE must be ...". None (an optional key
# left unset) is always allowed; for a list or a dict the declaration holds for each item. These
# live here, in the lower layer, because training/config/schema.py declares its fields with them
# and data/ imports nothing from training/.

ALLOWED = "allowed"  # the field-metadata key of a declaration


@dataclass(frozen=True)
class Allowed:
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself is refused
    high_open: bool = False  # high itself is refused
    values: Tuple = ()  # an enumeration's choices
    rule: Optional[Callable[[Any], bool]] = None  # a test no bound states (a format, a path)
    wanted: str = ""  # what `rule` asks for: "must be <wanted>"

    def refusal(self, value) -> Optional[str]:
        """None when `value` is allowed; else what follows "KEY=VALUE" in the error."""
        if self.values:
            return None if value in self.values else f"is not one of {', '.join(map(str, self.values))}"
        if self.rule is not None:
            return None if self.rule(value) else f"must be {self.wanted}"
        if not math.isfinite(value):
            return "must be a finite number"
        if ((self.low is None or value > self.low or value == self.low and not self.low_open)
                and (self.high is None or value < self.high or value == self.high and not self.high_open)):
            return None
        return self.requirement()

    def requirement(self) -> str:
        if self.high is not None:
            return (f"must be in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low == 0:
            return "must be positive" if self.low_open else "must not be negative"
        return f"must be greater than {self.low:g}" if self.low_open else f"must be at least {self.low:g}"


def at_least(low) -> dict:
    return {ALLOWED: Allowed(low=low)}


def positive() -> dict:
    return {ALLOWED: Allowed(low=0, low_open=True)}


def in_range(low, high, *, low_open: bool = False, high_open: bool = False) -> dict:
    return {ALLOWED: Allowed(low=low, high=high, low_open=low_open, high_open=high_open)}


def one_of(*values) -> dict:
    return {ALLOWED: Allowed(values=tuple(values))}


def satisfies(wanted: str, rule: Callable[[Any], bool]) -> dict:
    """A rule no bound or list states: `wanted` completes "KEY=VALUE must be ..."."""
    return {ALLOWED: Allowed(rule=rule, wanted=wanted)}


SEED_RANGE = (0, 2 ** 32 - 1)  # numpy's RandomState (megatron-core's dataset shuffles) takes no other


def is_split(text: str) -> bool:
    """data.split: up to three comma-separated non-negative numbers (train,valid,test), not all 0."""
    parts = str(text).split(",")
    if len(parts) > 3 or not all(re.fullmatch(r"\s*\d+(\.\d*)?\s*", part) for part in parts):
        return False
    return sum(float(part) for part in parts) > 0


@dataclass
class TokenizerConfig:
    # An existing tokenizer directory (ours or the released BLOOM one). None: train one on the
    # corpus into <cache_dir>/tokenizer-<key> (reused while corpus and settings are unchanged).
    path: Optional[str] = None
    vocab_size: int = field(default=8000, metadata=positive())
    # per-language smoothing of the training sample (BLOOM: 0.3-0.5)
    alpha: float = field(default=0.3, metadata=in_range(0, 1, low_open=True))
    # size of the re-weighted sample; None: the corpus size
    sample_bytes: Optional[int] = field(default=None, metadata=positive())
    min_frequency: int = field(default=2, metadata=at_least(0))
    seed: int = 42  # any integer: Python's random.Random draws the sample


@dataclass
class DatasetSpec:
    """One blend component: a preprocessed language/source, or any existing .bin/.idx prefix."""

    name: str = "???"
    prefix: Optional[str] = None  # None: <processed dir>/<name>
    # None for all: weights from token counts, alpha-smoothed
    weight: Optional[float] = field(default=None, metadata=at_least(0))


@dataclass
class DataConfig:
    seq_length: int = field(default=2048, metadata=positive())
    # Raw corpus to preprocess (JSONL files/folders, compressed or not, or HF dataset dirs).
    # Empty: only `blend` prefixes are used and nothing is preprocessed.
    corpus: List[str] = field(default_factory=lambda: ["data/corpora"])
    text_key: str = "text"
    lang_key: str = "lang"
    # one indexed dataset per "lang" field value, or per "source" file
    group_by: str = field(default="lang", metadata=one_of("lang", "source"))
    cache_dir: str = "data_cache"  # tokenizer, .bin/.idx and index caches live here
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Empty: every preprocessed dataset. Weights: all given (explicit) or none (from tokens).
    blend: List[DatasetSpec] = field(default_factory=list)
    # smoothing of token-count weights: p_i^alpha / sum_j p_j^alpha; 1 = raw
    alpha: float = field(default=0.3, metadata=in_range(0, 1, low_open=True))
    # train,valid,test per mille of each dataset's documents
    split: str = field(default="969,30,1", metadata=satisfies(
        "up to three comma-separated non-negative numbers (train,valid,test), not all 0", is_split))
    seed: int = field(default=1234, metadata=in_range(*SEED_RANGE))
    per_language_valid: bool = True  # also one validation set per dataset (per-language loss)
    eod_mask_loss: bool = False
    # None: one worker process per core; 1: in-process
    preprocess_workers: Optional[int] = field(default=None, metadata=at_least(1))
    strict: bool = False  # refuse bad corpus lines instead of skipping them
    loader_workers: int = field(default=0, metadata=at_least(0))  # torch DataLoader workers per rank
    # Explicit weights per dataset name, merged into `blend` (handy on the command line:
    # data.weights.en=0.3); ignored when empty.
    weights: Dict[str, float] = field(default_factory=dict, metadata=at_least(0))
