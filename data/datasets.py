"""Train / valid / test datasets and one validation set per language, on megatron-core.

Built with BlendedMegatronDatasetBuilder + GPTDataset, so the blending (each sample from the
dataset whose realised share lags its weight most), splits and shuffles are megatron's,
deterministic in `data.seed`. Each split is built from its own blend, the datasets whose part of
it holds a full sample (data.split_fit), with megatron's document ranges. Their index caches
are built once, by rank 0, into a directory written aside and renamed when complete (named by
a hash of everything that determines them), then loaded by every rank: a killed build never
leaves a cache that looks valid.
"""
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from data.blend import BlendEntry, resolve_blend
from data.config import DataConfig
from data.distributed import ensure_process_group, on_rank0_then_all, rank
from data.prepare import PreparedData, _check_visible, prepare_data, resolve_cache
from data.split_fit import SPLITS, SplitFit, fit_split, fit_train, split_matrix
from data.tokenizer import TokenizerInfo

log = logging.getLogger(__name__)


@dataclass
class DataSplits:
    train: object | None
    valid: object | None
    test: object | None
    valid_per_dataset: dict = field(default_factory=dict)  # name -> one-epoch GPTDataset
    blend: list = field(default_factory=list)  # [BlendEntry] training draws from (weights renormalised)
    tokenizer: TokenizerInfo | None = None
    blends: dict = field(default_factory=dict)  # split name -> [BlendEntry] of each split built
    left_out: list = field(default_factory=list)  # [LeftOut]: a dataset out of a split, and why
    seq_length: int = 0
    data_split: str = ""


def build_datasets(cfg: DataConfig, train_samples: int, valid_samples: int = 0, test_samples: int = 0,
                   prepared: PreparedData | None = None) -> DataSplits:
    """Blended train/valid/test of at least the given sizes; call on every rank.

    A size of 0 leaves that split out (None). Each split blends only the datasets whose part of
    it holds a full sample (see data.split_fit); a valid or test split left with none is None,
    a train split left with none is a DataError. Preprocesses the corpus first if needed.
    """
    ensure_process_group()
    prepared = prepared or prepare_data(cfg)
    tokenizer = TokenizerInfo(prepared.tokenizer_dir)
    blend = resolve_blend(cfg, prepared.processed_dir, prepared.summary)
    sizes = [train_samples, valid_samples, test_samples]
    fits = _fit_splits(cfg, blend, sizes)
    _say_left_out(cfg, fits)
    built = {name: _build_split(cfg, tokenizer, fits.get(name), index, size)
             for index, (name, size) in enumerate(zip(SPLITS, sizes))}
    valid_fit = fits.get("valid")
    per_dataset = {}
    if cfg.per_language_valid and valid_fit:
        per_dataset = build_per_dataset_valid(cfg, tokenizer, valid_fit.blend)
    return DataSplits(built["train"], built["valid"], built["test"], per_dataset,
                      fits["train"].blend if "train" in fits else blend, tokenizer,
                      blends={name: fits[name].blend for name, ds in built.items() if ds is not None},
                      left_out=[left for fit in fits.values() for left in fit.left_out],
                      seq_length=cfg.seq_length, data_split=cfg.split)


def _fit_splits(cfg: DataConfig, blend: list[BlendEntry], sizes: list) -> dict[str, SplitFit]:
    """The fit of each split wanted (and given documents by data.split); the valid split is
    wanted for the per-language validation sets too."""
    matrix = split_matrix(cfg.split)
    fits = {"train": fit_train(blend, matrix, cfg.seq_length, cfg.split)} if sizes[0] else {}
    for index in (1, 2):
        wanted = sizes[index] or (index == 1 and cfg.per_language_valid)
        if wanted and matrix[index] is not None:
            fits[SPLITS[index]] = fit_split(blend, matrix, index, cfg.seq_length, cfg.split)
    return fits


def _say_left_out(cfg: DataConfig, fits: dict[str, SplitFit]) -> None:
    if rank() != 0:  # every rank computes the same fits; one says them
        return
    for fit in fits.values():
        for left in fit.left_out:
            log.warning("data: %s", left.line())
        if not fit.blend:
            log.warning("data: %s: no %s split", fit.nothing_left_line(cfg.seq_length, cfg.split), fit.split)


def _build_split(cfg: DataConfig, tokenizer: TokenizerInfo, fit: SplitFit | None, index: int, size: int):
    """One split from its own blend; the same data.split keeps each dataset's document range."""
    if not size or fit is None or not fit.blend:
        return None
    config = _gpt_config(cfg, tokenizer, fit.blend)
    config.split_matrix = [bounds if i == index else None for i, bounds in enumerate(config.split_matrix)]
    sizes = [size if i == index else 0 for i in range(len(SPLITS))]
    return _build_cached(cfg, config, sizes, {"blend": [e.__dict__ for e in fit.blend]})[index]


def build_per_dataset_valid(cfg: DataConfig, tokenizer: TokenizerInfo, blend: list[BlendEntry]) -> dict:
    """One-epoch validation set of each dataset (its own valid documents, none of the training
    ones); `blend` holds only datasets whose valid part holds a sample (see data.split_fit)."""
    out = {}
    for entry in blend:
        config = _gpt_config(cfg, tokenizer, [BlendEntry(entry.name, entry.prefix, 1.0, entry.tokens)], weighted=False)
        config.split_matrix = [None, config.split_matrix[1], None]
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
