"""The blend: which indexed datasets, with which weights.

Weights are either all explicit (normalised) or all derived from the datasets' token counts
with alpha smoothing, p_i^alpha / sum_j p_j^alpha (alpha=1: proportional to tokens).
"""
from dataclasses import dataclass
from pathlib import Path

from data.config import DataConfig, DatasetSpec
from data.errors import DataError
from data.index_file import split_matrix, token_counts
from data.paths import resolve_path
from data.smoothing import smoothed_shares


@dataclass(frozen=True)
class BlendEntry:
    name: str
    prefix: str
    weight: float
    tokens: int


def resolve_blend(cfg: DataConfig, processed_dir: Path | None, summary: dict | None) -> list[BlendEntry]:
    specs = _specs(cfg, summary)
    prefixes = {s.name: _prefix(s, processed_dir) for s in specs}
    matrix = split_matrix(cfg.split)  # each .idx read once here: the split fits reuse its counts
    tokens = {name: token_counts(prefix, matrix)[0] for name, prefix in prefixes.items()}
    weights = _weights(cfg, specs, tokens)
    return [BlendEntry(s.name, prefixes[s.name], weights[s.name], tokens[s.name]) for s in specs]


def _specs(cfg: DataConfig, summary: dict | None) -> list[DatasetSpec]:
    if cfg.blend:
        specs = [DatasetSpec(s.name, s.prefix, s.weight) for s in cfg.blend]
    elif summary is not None:
        specs = [DatasetSpec(name) for name, out in sorted(summary["outputs"].items()) if out["documents"] > 0]
    else:
        raise DataError("data.blend is empty and there is no preprocessed corpus (data.corpus) to blend")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataError(f"data.blend names a dataset twice: {names}")
    unknown = set(cfg.weights) - set(names)
    if unknown:
        raise DataError(f"data.weights names datasets not in the blend: {sorted(unknown)}")
    for spec in specs:
        if spec.name in cfg.weights:
            spec.weight = float(cfg.weights[spec.name])
    return specs


def _prefix(spec: DatasetSpec, processed_dir: Path | None) -> str:
    if spec.prefix:
        return str(resolve_path(spec.prefix))
    if processed_dir is None:
        raise DataError(f"data.blend entry {spec.name!r} has no prefix and no corpus was preprocessed")
    return str(processed_dir / spec.name)


def _weights(cfg: DataConfig, specs: list[DatasetSpec], tokens: dict[str, int]) -> dict[str, float]:
    given = [s.weight for s in specs if s.weight is not None]
    if given and len(given) != len(specs):
        missing = [s.name for s in specs if s.weight is None]
        raise DataError(f"data.blend: give a weight to every dataset or to none; missing for {missing}")
    if given:
        if any(w < 0 for w in given) or sum(given) <= 0:
            raise DataError(f"data.blend weights must be >= 0 with a positive sum, got {given}")
        total = sum(given)
        return {s.name: s.weight / total for s in specs}
    empty = [name for name, count in tokens.items() if count == 0]
    if empty:
        raise DataError(f"data.blend: datasets without tokens: {empty}")
    return smoothed_shares(tokens, cfg.alpha)
