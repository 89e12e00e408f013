"""The merge of a sharded preprocessing run: each language's shards, in shard order, into one
.bin/.idx with megatron-core's own `IndexedDatasetBuilder.add_index`, and one summary.json.

    python -m data.shard_merge OUTPUT_DIR

Every shard of the plan must be finished (its directory with its summary, and each output it
counts on disk at the size it counts): a missing or incomplete one is refused in one line naming
it, before anything is written. Shards hold consecutive pieces of the inputs, so concatenating
them in shard order gives the documents in input order: the files are byte for byte those of a
one-machine run. Each output is written aside and renamed (the .idx last), summary.json after all
of them, as a one-machine run does. The shards stay: merging again gives the same files.
"""
import argparse
import os
import sys
import time
from functools import reduce
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.index_file import document_lengths
from data.shard_plan import read_plan, shard_name, shards_dir
from data.summary import MAX_LISTED_SKIPS, SUMMARY_NAME, read_summary, write_json_atomic


def merge_shards(output_dir: str | Path) -> dict:
    started = time.perf_counter()
    out = Path(output_dir)
    plan = read_plan(out)
    summaries = [_finished_shard(out, index, plan.count) for index in range(plan.count)]
    names = sorted({name for summary in summaries for name in summary["outputs"]})
    for name in names:
        shards = [index for index, summary in enumerate(summaries)
                  if summary["outputs"].get(name, {}).get("documents", 0) > 0]
        if shards:
            _merge_output(out, name, shards, np.dtype(summaries[0]["dtype"]).type)
    inputs = list(dict.fromkeys(str(piece.path) for shard in plan.shards for piece in shard))
    summary = _summed(out, summaries, inputs, time.perf_counter() - started)
    write_json_atomic(out / SUMMARY_NAME, summary)
    return summary


def _finished_shard(out: Path, index: int, count: int) -> dict:
    """The shard's summary, once its outputs are checked against it."""
    directory = shards_dir(out) / shard_name(index)
    where = f"shard {index} of {count} ({directory})"
    if not directory.is_dir():
        raise DataError(f"{where} is missing: rerun the array job (finished shards are kept), then the merge")
    summary = read_summary(directory)
    if summary is None:
        raise DataError(f"{where} is incomplete (no {SUMMARY_NAME}): rerun the array job, then the merge")
    itemsize = np.dtype(summary["dtype"]).itemsize
    for name, stats in summary["outputs"].items():
        if stats["documents"] == 0:
            continue
        prefix = directory / name
        try:
            documents = len(document_lengths(prefix))
        except DataError as err:
            raise DataError(f"{where} is incomplete: {err}") from None
        size = Path(f"{prefix}.bin").stat().st_size
        if documents != stats["documents"] or size != stats["tokens"] * itemsize:
            raise DataError(f"{where} is incomplete: {name} holds {documents} documents in {size} bytes, "
                            f"its summary counts {stats['documents']} in {stats['tokens'] * itemsize}")
    return summary


def _merge_output(out: Path, name: str, shards: list[int], dtype) -> None:
    # megatron-core's builder imports torch: only the merge pays for it, never a shard task.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    final_bin, final_idx = out / f"{name}.bin", out / f"{name}.idx"
    tmp_bin = final_bin.with_name(f"{final_bin.name}.tmp-{os.getpid()}")
    tmp_idx = final_idx.with_name(f"{final_idx.name}.tmp-{os.getpid()}")
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        for index in shards:
            builder.add_index(str(shards_dir(out) / shard_name(index) / name))
        builder.finalize(str(tmp_idx))
        for path in (tmp_bin, tmp_idx):
            _fsync(path)
        # As a one-machine run replaces them: the old .idx goes first and the new one comes last,
        # so no reader pairs a new .bin with an old .idx.
        final_idx.unlink(missing_ok=True)
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    except BaseException:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


SAME_IN_EVERY_SHARD = ("tokenizer", "dtype", "group_by")  # the plan fixes them
RATES = ("inputs", "seconds", "documents_per_second", "tokens_per_second")  # recomputed below


def _summed(out: Path, summaries: list[dict], inputs: list[str], merge_seconds: float) -> dict:
    """The shards' summaries added up into the summary a one-machine run writes."""
    total = {key: summaries[0][key] for key in SAME_IN_EVERY_SHARD if key in summaries[0]}
    counted = dict.fromkeys(key for summary in summaries for key in summary
                            if key not in SAME_IN_EVERY_SHARD and key not in RATES)
    for key in counted:
        total[key] = reduce(_add, [summary[key] for summary in summaries if key in summary])
    for name, stats in total["outputs"].items():
        stats["prefix"] = str(out / name) if stats["documents"] > 0 else None
        stats["skipped_lines"] = stats["skipped_lines"][:MAX_LISTED_SKIPS]
    total["inputs"] = inputs  # the files, where a shard's summary names its pieces
    work = sum(summary["seconds"] for summary in summaries) + merge_seconds
    total["shards"] = len(summaries)
    total["seconds"] = round(work, 3)  # the tasks' time added up, and the merge's
    total["merge_seconds"] = round(merge_seconds, 3)
    total["documents_per_second"] = round(total["total"]["documents"] / max(work, 1e-9), 1)
    total["tokens_per_second"] = round(total["total"]["tokens"] / max(work, 1e-9), 1)
    return total


def _add(a, b):
    """Counts add, lists (of skipped lines, of bad files) follow each other, dicts add by key."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **b, **{key: _add(a[key], b[key]) for key in a if key in b}}
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a + b
    return a


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.shard_merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    try:
        summary = merge_shards(args.output_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = summary["total"]
    print(f"bloom-preprocess: merged {summary['shards']} shards into {args.output_dir}: "
          f"{len(summary['outputs'])} outputs, {total['documents']} documents, {total['tokens']} tokens, "
          f"{total['skipped']} skipped ({summary['merge_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
