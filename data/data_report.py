"""The run's data report: what each split blends, with which weights, and what was left out.

Written once per run (run_dir/data.json, by rank 0) so a run that left a small language out of
a split, or ran without validation, says so where its results are, not only in its console log.
"""
from dataclasses import asdict
from pathlib import Path

from data.summary import write_json_atomic


def data_report(splits) -> dict:
    """A JSON-ready dict of a data.datasets.DataSplits."""
    return {
        "seq_length": splits.seq_length,
        "split": splits.data_split,
        "splits": {name: _blend(splits.blends.get(name)) for name in ("train", "valid", "test")},
        "per_language_valid": sorted(splits.valid_per_dataset),
        "left_out": [{**asdict(left), "reason": left.line()} for left in splits.left_out],
    }


def write_data_report(path: str | Path, splits) -> None:
    """Write data_report(splits) to `path` as JSON (aside, then renamed)."""
    write_json_atomic(Path(path), data_report(splits))


def _blend(entries: list | None) -> list | None:
    # None: the split was not built (not asked for, or no dataset's part of it holds a sample).
    if entries is None:
        return None
    return [{"name": e.name, "weight": e.weight, "dataset_tokens": e.tokens, "prefix": e.prefix} for e in entries]
