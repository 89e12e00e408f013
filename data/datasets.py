"""Train / valid / test datasets and one validation set per language, on megatron-core.

Built with BlendedMegatronDatasetBuilder + GPTDataset, so the blending (each sample from the
dataset whose realised share lags its weight most), splits and shuffles are megatron's,
deterministic in `data.seed`. Their index caches are built once, by rank 0, into a directory
written aside and renamed when complete (named by a hash of everything that determines them),
then loaded by every rank: a killed build never leaves a cache that looks valid.
"""
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from data.blend import BlendEntry, resolve_blend
from data.config import DataConfig
from data.distributed import ensure_process_group, on_rank0_then_all, rank
from data.errors import DataError
from data.index_file import split_token_counts
from data.prepare import PreparedData, _check_visible, prepare_data, resolve_cache
from data.tokenizer import TokenizerInfo

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


@dataclass
class DataSplits:
    train: object | None
    valid: object | None
    test: object | None
    valid_per_dataset: dict = field(default_factory=dict)  # name -> one-epoch GPTDataset
    blend: list = field(default_factory=list)  # [BlendEntry]
    tokenizer: TokenizerInfo | None = None


def build_datasets(cfg: DataConfig, train_samples: int, valid_samples: int = 0, test_samples: int = 0,
                   prepared: PreparedData | None = None) -> DataSplits:
    """Blended train/valid/test of at least the given sizes; call on every rank.

    A size of 0 leaves that split out (None). Preprocesses the corpus first if needed.
    """
    ensure_process_group()
    prepared = prepared or prepare_data(cfg)
    tokenizer = TokenizerInfo(prepared.tokenizer_dir)
    blend = resolve_blend(cfg, prepared.processed_dir, prepared.summary)
    sizes = [train_samples, valid_samples, test_samples]
    config = _gpt_config(cfg, tokenizer, blend)
    config.split_matrix = [b if size else None for b, size in zip(config.split_matrix, sizes)]
    _check_splits_hold_samples(cfg, blend, config.split_matrix)
    train, valid, test = _build_cached(cfg, config, sizes, {"blend": [e.__dict__ for e in blend]})
    per_dataset = build_per_dataset_valid(cfg, tokenizer, blend) if cfg.per_language_valid else {}
    return DataSplits(train, valid, test, per_dataset, blend, tokenizer)


def build_per_dataset_valid(cfg: DataConfig, tokenizer: TokenizerInfo, blend: list[BlendEntry]) -> dict:
    """One-epoch validation set of each dataset (its own valid documents, none of the training ones)."""
    out = {}
    for entry in blend:
        config = _gpt_config(cfg, tokenizer, [BlendEntry(entry.name, entry.prefix, 1.0, entry.tokens)], weighted=False)
        config.split_matrix = [None, config.split_matrix[1], None]
        if config.split_matrix[1] is None:
            return {}
        tokens = split_token_counts(entry.prefix, config.split_matrix)[1]
        if tokens < cfg.seq_length + 1:
            log.warning("no per-language validation set for %s: its valid split holds %d tokens < %d",
                        entry.name, tokens, cfg.seq_length + 1)
            continue
        _, valid, _ = _build_cached(cfg, config, [None, None, None], {"valid_of": entry.prefix})
        out[entry.name] = valid
    return out


def _gpt_config(cfg: DataConfig, tokenizer: TokenizerInfo, blend: list[BlendEntry], weighted: bool = True):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=([e.prefix for e in blend], [e.weight for e in blend] if weighted else None),
        split=cfg.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,  # causal (ALiBi) attention builds its own mask
        path_to_cache=None,  # set per build, see _build_cached
    )


def _check_splits_hold_samples(cfg: DataConfig, blend: list[BlendEntry], split_matrix) -> None:
    """megatron-core never returns on a split without a full sample: refuse it up front."""
    need = cfg.seq_length + 1
    for entry in blend:
        for name, count in zip(SPLITS, split_token_counts(entry.prefix, split_matrix)):
            if count is not None and count < need:
                raise DataError(f"dataset {entry.name!r}: its {name} split (data.split={cfg.split}) holds "
                                f"{count} tokens, fewer than seq_length+1={need}")


def _build_cached(cfg: DataConfig, config, sizes: list, identity: dict) -> list:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    key = _cache_key(config, sizes, identity)
    final = resolve_cache(cfg) / "indices" / key
    if not on_rank0_then_all(lambda: final.is_dir()):
        # Rank 0 builds into a staging dir (others take part in megatron's barriers only).
        staging = final.with_name(f".{key}.tmp-{os.getpid()}")
        config.path_to_cache = str(staging)
        BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: rank() == 0, config).build()
        on_rank0_then_all(lambda: _publish(staging, final))
    _check_visible(final)
    config.path_to_cache = str(final)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def _publish(staging: Path, final: Path) -> None:
    if final.exists():  # another job built the same indices meanwhile: theirs are identical
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.rename(staging, final)


def _cache_key(config, sizes: list, identity: dict) -> str:
    files = []
    for prefix in config.blend[0]:
        stat = os.stat(f"{prefix}.idx")
        files.append([prefix, stat.st_size, stat.st_mtime_ns, os.stat(f"{prefix}.bin").st_size])
    payload = {"files": files, "sizes": sizes, "seed": config.random_seed, "seq": config.sequence_length,
               "split_matrix": config.split_matrix, "tokenizer": config.tokenizer.fingerprint,
               "eod_mask_loss": config.eod_mask_loss, "weights": config.blend[1], **identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
