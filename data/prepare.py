"""From a DataConfig to a tokenizer directory and preprocessed .bin/.idx files, doing only the
work that is missing.

Both live under `cache_dir` in directories named by a hash of what determines them (corpus
files, their sizes and times, the settings; for data also the tokenizer's content), so a change
in any of them makes new ones and an unchanged config reuses the old. Rank 0 does the work, the
other ranks wait and then check they can see it, waiting a little for another node's files to
show (a cache_dir that is not on a shared filesystem is reported, not raced on).
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from data.config import DataConfig
from data.distributed import on_rank0_then_all
from data.errors import DataError
from data.index_cache import wait_visible
from data.paths import resolve_path
from data.preprocess_run import PreprocessOptions, preprocess
from data.records import RecordKeys
from data.sources import expand_inputs
from data.summary import read_summary
from data.tokenizer import TokenizerInfo
from data.tokenizer_train import train_tokenizer


@dataclass
class PreparedData:
    tokenizer_dir: Path
    processed_dir: Path | None  # None when the config has no corpus to preprocess
    summary: dict | None


def prepare_data(cfg: DataConfig, progress: bool = False) -> PreparedData:
    """Tokenizer + preprocessed corpus for cfg, built on rank 0 if missing; call on all ranks."""
    tokenizer_dir = prepare_tokenizer(cfg)
    if not cfg.corpus:
        return PreparedData(tokenizer_dir, None, None)
    processed = on_rank0_then_all(lambda: str(_preprocess_if_needed(cfg, tokenizer_dir, progress)))
    _check_visible(Path(processed) / "summary.json")
    return PreparedData(tokenizer_dir, Path(processed), read_summary(processed))


def prepare_tokenizer(cfg: DataConfig) -> Path:
    """The configured tokenizer dir, or one trained on the corpus (once) under cache_dir."""
    if cfg.tokenizer.path:
        path = resolve_path(cfg.tokenizer.path)
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"data.tokenizer.path has no tokenizer.json: {path}")
        return path
    if not cfg.corpus:
        raise DataError("data.tokenizer.path is unset and data.corpus is empty: nothing to train a tokenizer on")
    t = cfg.tokenizer
    key = _digest({"corpus": _corpus_fingerprint(cfg), "vocab": t.vocab_size, "alpha": t.alpha,
                   "sample_bytes": t.sample_bytes, "min_frequency": t.min_frequency, "seed": t.seed,
                   "keys": [cfg.text_key, cfg.lang_key]})
    target = resolve_cache(cfg) / f"tokenizer-{key}"

    def train() -> str:
        if not (target / "tokenizer.json").is_file():
            train_tokenizer(cfg.corpus, target, vocab_size=t.vocab_size, alpha=t.alpha,
                            sample_bytes=t.sample_bytes, seed=t.seed, min_frequency=t.min_frequency,
                            keys=RecordKeys(cfg.text_key, cfg.lang_key))
        return str(target)

    path = Path(on_rank0_then_all(train))
    _check_visible(path / "tokenizer.json")
    return path


def resolve_cache(cfg: DataConfig) -> Path:
    # Relative to the working directory (typically the run directory), never the package.
    return Path(cfg.cache_dir).expanduser().resolve()


def _preprocess_if_needed(cfg: DataConfig, tokenizer_dir: Path, progress: bool) -> Path:
    key = _digest({"corpus": _corpus_fingerprint(cfg), "tokenizer": TokenizerInfo(tokenizer_dir).fingerprint,
                   "keys": [cfg.text_key, cfg.lang_key], "group_by": cfg.group_by, "strict": cfg.strict})
    out = resolve_cache(cfg) / f"processed-{key}"
    if read_summary(out) is None:  # the summary is written last: absent means not complete
        options = PreprocessOptions(keys=RecordKeys(cfg.text_key, cfg.lang_key), group_by=cfg.group_by,
                                    workers=cfg.preprocess_workers, strict=cfg.strict, progress=progress)
        preprocess(cfg.corpus, tokenizer_dir, out, options)
    return out


def _corpus_fingerprint(cfg: DataConfig) -> list:
    """Each input file's path, size and modification time: cheap, and changes when data does."""
    entries = []
    for source in expand_inputs(cfg.corpus):
        files = [source.path] if source.path.is_file() else sorted(p for p in source.path.rglob("*") if p.is_file())
        entries += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return entries


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _check_visible(path: Path) -> None:
    wait_visible(path)  # waits a little on each rank: NFS shows another node's new file late
