"""One task of the preprocessing array job: shard i of the plan into <out>/shards/shard-0000i/.

    python -m data.shard_task OUTPUT_DIR [INDEX] [--workers N]     (INDEX: $SLURM_ARRAY_TASK_ID)

The shard's .bin/.idx per language and its summary are written into a directory aside
(`shard-0000i.tmp-<host>-<pid>`) that is renamed to `shard-0000i` only once all of it is on disk:
a task killed mid-shard leaves nothing the merge would read, and a finished shard is never
rewritten, so a rerun of the whole array job redoes only the shards that are missing.
"""
import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

from data.errors import DataError
from data.preprocess_run import PreprocessOptions, preprocess_sources
from data.records import RecordKeys
from data.shard_plan import ShardPlan, read_plan, shard_name, shards_dir
from data.summary import SUMMARY_NAME


def shard_options(plan: ShardPlan, workers: int | None, progress: bool = False) -> PreprocessOptions:
    """The one-machine run's options, as the plan recorded them, with this task's workers."""
    opts = plan.options
    return PreprocessOptions(keys=RecordKeys(text=opts["text_key"], lang=opts["lang_key"]),
                             group_by=opts["group_by"], workers=workers, strict=opts["strict"],
                             chunk_bytes=opts["chunk_bytes"], progress=progress)


def run_shard(output_dir: str | Path, index: int, workers: int | None = None) -> dict | None:
    """Preprocess shard `index` of the plan; None when it was finished already."""
    plan = read_plan(output_dir)
    if not 0 <= index < plan.count:
        raise DataError(f"shard {index} is not in the plan's {plan.count} shards (0-{plan.count - 1})")
    final = shards_dir(output_dir) / shard_name(index)
    if (final / SUMMARY_NAME).is_file():
        return None
    _remove_leftovers(final)
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        summary = preprocess_sources(plan.shards[index], plan.tokenizer, tmp, shard_options(plan, workers))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _remove_leftovers(final: Path) -> None:
    """What a killed earlier start of this shard left: its aside directory (from any host: one
    task at a time works on a shard), or a final directory without its summary."""
    for stale in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.shard_task", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("index", nargs="?", type=int, default=None,
                        help="the shard (default: $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    args = parser.parse_args(argv)
    index = args.index
    if index is None:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        if task is None or not task.isdigit():
            print("error: no shard index given and SLURM_ARRAY_TASK_ID is not set", file=sys.stderr)
            return 2
        index = int(task)
    try:
        summary = run_shard(args.output_dir, index, args.workers)
    except DataError as err:
        print(f"error: shard {index}: {err}", file=sys.stderr)
        return 2
    where = f"{shard_name(index)} on {socket.gethostname()}"
    if summary is None:
        print(f"bloom-preprocess: {where}: finished by an earlier start, kept")
    else:
        total = summary["total"]
        print(f"bloom-preprocess: {where}: {total['documents']} documents, {total['tokens']} tokens, "
              f"{total['skipped']} skipped, {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
