"""The blend: which indexed datasets, with which weights.

Weights are either all explicit (normalised) or all derived from the datasets' token counts
with alpha smoothing, p_i^alpha / sum_j p_j^alpha (alpha=1: proportional to tokens).
"""
from dataclasses import dataclass
from pathlib import Path

from data.config import DataConfig, DatasetSpec
from data.errors import DataError
from data.index_file import token_counts
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
    from data.split_fit import split_matrix  # (split_fit imports this module)

    matrix = split_matrix(cfg.split)  # each .idx read once here: the split fits reuse its counts
    tokens = {name: token_counts(prefix, matrix)[0] for name, prefix in prefixes.items()}
    weights = _weights(cfg, specs, tokens)
    return [BlendEntry(s.name, prefixes[s.name], weights[s.name], tokens[s.name]) for s in specs]


def _specs(cfg: DataConfig, summary: dict | None) -> list[DatasetSpec]:
    if cfg.blend and cfg.blend_file:
        raise DataError("give data.blend or data.blend_file, not both")
    if cfg.blend_file:
        specs = read_blend_file(cfg.blend_file)
    elif cfg.blend:
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


def read_blend_file(path: str) -> list[DatasetSpec]:
    """data.blend_file: a YAML (or JSON) list of {name, prefix, weight}, as data.blend takes."""
    import yaml

    file = resolve_path(path)
    if not file.is_file():
        raise DataError(f"data.blend_file not found: {file}")
    try:
        items = yaml.load(file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as error:
        raise DataError(f"data.blend_file {file} is not YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and i.get("name") for i in items):
        raise DataError(f"data.blend_file {file} must hold a list of {{name, prefix, weight}} mappings")
    unknown = {key for item in items for key in item} - {"name", "prefix", "weight"}
    if unknown:
        raise DataError(f"data.blend_file {file}: unknown keys {sorted(unknown)} (name, prefix, weight)")
    bad = [i["name"] for i in items if i.get("weight") is not None and not isinstance(i["weight"], (int, float))]
    if bad:
        raise DataError(f"data.blend_file {file}: the weight of {bad[0]!r} is not a number")
    return [DatasetSpec(str(i["name"]), i.get("prefix"), i.get("weight")) for i in items]


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
