"""Train / valid / test datasets and one validation set per language, on megatron-core.

Built with BlendedMegatronDatasetBuilder + GPTDataset, so the blending (each sample from the
dataset whose realised share lags its weight most), splits and shuffles are megatron's,
deterministic in `data.seed`. Each split is built from its own blend, the datasets whose part of
it holds a full sample (data.split_fit), with megatron's document ranges. Their index caches are
built once, by global rank 0, published by one rename and read by every other rank and node
(data.index_cache); each .bin/.idx prefix is opened once for all splits (data.gpt_build), so a
blend of thousands of shards starts about as fast as one of a few dozen.
"""
import logging
import socket
from dataclasses import dataclass, field

import torch.distributed as dist

from data.blend import BlendEntry, resolve_blend
from data.config import DataConfig
from data.distributed import ensure_process_group, rank
from data.gpt_build import gpt_config, gpt_dataset_class
from data.index_cache import CacheUse, build_cached
from data.open_files import allow_open_files
from data.prepare import PreparedData, prepare_data, resolve_cache
from data.index_file import split_matrix
from data.split_fit import SPLITS, SplitFit, fit_split, fit_train
from data.tokenizer import TokenizerInfo
from data.valid_sets import build_per_language_valid

log = logging.getLogger(__name__)
SAID_PER_SPLIT = 50  # left-out datasets named one per line; beyond, a count (data.json has all)


@dataclass
class DataSplits:
    train: object | None
    valid: object | None
    test: object | None
    valid_per_dataset: dict = field(default_factory=dict)  # language -> one-epoch validation set
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
    allow_open_files(len(blend))
    sizes = [train_samples, valid_samples, test_samples]
    fits = _fit_splits(cfg, blend, sizes)
    _say_left_out(cfg, fits)
    cls, use = gpt_dataset_class(), CacheUse(resolve_cache(cfg))
    built = {name: _build_split(cfg, tokenizer, fits.get(name), index, size, cls, use)
             for index, (name, size) in enumerate(zip(SPLITS, sizes))}
    valid_fit = fits.get("valid")
    per_language = {}
    if cfg.per_language_valid and valid_fit:
        per_language = build_per_language_valid(cfg, tokenizer, valid_fit.blend, cls, use)
    _say_cache_use(use)
    return DataSplits(built["train"], built["valid"], built["test"], per_language,
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
        for left in fit.left_out[:SAID_PER_SPLIT]:
            log.warning("data: %s", left.line())
        if len(fit.left_out) > SAID_PER_SPLIT:
            log.warning("data: and %d more datasets left out of the %s split (all listed in the run's data.json)",
                        len(fit.left_out) - SAID_PER_SPLIT, fit.split)
        if not fit.blend:
            log.warning("data: %s: no %s split", fit.nothing_left_line(cfg.seq_length, cfg.split), fit.split)


def _say_cache_use(use: CacheUse) -> None:
    """One line for the job: which ranks built and which read the index caches, on which hosts
    (on many nodes, a cache built twice or read nowhere shows here)."""
    mine = (rank(), socket.gethostname(), len(use.built), len(use.read))
    every = [mine]
    if dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    if rank() != 0:
        return
    builders = sorted({f"rank {r} on {host}" for r, host, built, _ in every if built})
    hosts = sorted({host for _, host, _, read in every if read})
    print(f"data: index caches in {use.root / 'indices'}: {sum(e[2] for e in every)} built"
          + (f" ({', '.join(builders)})" if builders else "")
          + f", read by {sum(1 for e in every if e[3])} rank(s) on {len(hosts)} host(s)"
          + (f" ({', '.join(hosts)})" if hosts else ""), flush=True)


def _build_split(cfg: DataConfig, tokenizer: TokenizerInfo, fit: SplitFit | None, index: int, size: int,
                 cls, use: CacheUse):
    """One split from its own blend; the same data.split keeps each dataset's document range."""
    if not size or fit is None or not fit.blend:
        return None
    config = gpt_config(cfg, tokenizer, [e.prefix for e in fit.blend], [e.weight for e in fit.blend])
    config.split_matrix = [bounds if i == index else None for i, bounds in enumerate(config.split_matrix)]
    sizes = [size if i == index else 0 for i in range(len(SPLITS))]
    return build_cached(cls, config, sizes, {"blend": [e.__dict__ for e in fit.blend]}, use)[index]
