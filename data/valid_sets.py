"""One validation set per language, whatever the number of shards a language arrives in.

A sharded corpus names its prefixes `<language>_<shard>` (en_0000, en_0001, ..., or en-00001-of-00040
as Hugging Face shards are named): a dataset's language is its name without a trailing shard
number. Each language's validation set is its shards' own valid documents, one epoch of each,
blended in proportion to their sizes (megatron-core's exhaustive blend). Grouping by language
instead of by prefix keeps evaluation at one loss per language (46, not 2,000 sets to evaluate
at every eval_interval) and builds a few blends instead of thousands of datasets. A language
held in one prefix (every blend of named languages such as en, zh, python) gets exactly the
validation set it had before: that dataset's one-epoch valid split.
"""
import re

from data.blend import BlendEntry
from data.index_cache import CacheUse, build_cached
from data.gpt_build import gpt_config
from data.tokenizer import TokenizerInfo

_SHARD = re.compile(r"[-_.](?:shard[-_.]?)?\d+(?:-of-\d+)?$")


def language_of(name: str) -> str:
    """`name` without a trailing shard number: en_0003 -> en, zh-00001-of-00040 -> zh, en -> en."""
    return _SHARD.sub("", name) or name


def by_language(blend: list[BlendEntry]) -> dict[str, list[BlendEntry]]:
    """The blend's datasets grouped by language, languages in order of first appearance."""
    groups: dict[str, list[BlendEntry]] = {}
    for entry in blend:
        groups.setdefault(language_of(entry.name), []).append(entry)
    return groups


def build_per_language_valid(cfg, tokenizer: TokenizerInfo, blend: list[BlendEntry], cls, use: CacheUse) -> dict:
    """{language: one-epoch validation set} of the datasets in `blend` (those whose valid part
    holds a sample, see data.split_fit); none of their training documents."""
    out = {}
    for language, entries in by_language(blend).items():
        config = gpt_config(cfg, tokenizer, [e.prefix for e in entries], None)
        config.split_matrix = [None, config.split_matrix[1], None]
        # One prefix: the same cache key as before languages were grouped (its cache is reused).
        identity = ({"valid_of": entries[0].prefix} if len(entries) == 1 else {"valid_of_language": language})
        _, valid, _ = build_cached(cls, config, [None, None, None], identity, use)
        out[language] = valid
    return out
