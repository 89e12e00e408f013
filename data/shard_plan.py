"""Split a corpus into N shards for preprocessing as a SLURM array job, and keep the split on disk.

A shard is a run of consecutive pieces of the inputs, in input order: a piece is a whole file
(JSONL, Arrow, a `datasets` directory) or a range of a Parquet file's row groups, so a shard
never cuts a document and the shards, concatenated in shard order, are the inputs in order.
That is what makes the merged output byte for byte a one-machine run's, whichever task finishes
first. Shards are balanced by on-disk bytes, the cost a task pays reading and tokenizing.

The plan is written once, beside the outputs (`<out>/shards/plan.json`), before any task starts:
every task and the merge read it rather than listing the inputs again, so a file added to an
input folder between two starts of the job cannot shift documents from one shard to another.
"""
import dataclasses
import json
import os
from bisect import bisect_left, bisect_right
from itertools import accumulate
from dataclasses import dataclass
from pathlib import Path

from data.errors import DataError
from data.sources import Source, piece_sizes

SHARDS_DIR = "shards"
PLAN_NAME = "plan.json"
PLAN_VERSION = 1


@dataclass
class ShardPlan:
    """The pieces of each shard, and what every task must agree on to tokenize them alike."""

    shards: list  # [[Source, ...], ...]: shard i's pieces, in input order
    tokenizer: str
    options: dict  # text_key, lang_key, group_by, strict, chunk_bytes

    @property
    def count(self) -> int:
        return len(self.shards)


def shards_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / SHARDS_DIR


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def split_pieces(sources: list[Source]) -> list[tuple[Source, int]]:
    """(piece, bytes) for every piece of the inputs, in input order: a Parquet file gives one
    piece per row group, anything else one piece."""
    pieces = []
    for source in sources:
        sizes = piece_sizes(source)
        if source.kind == "parquet" and len(sizes) > 1:
            pieces += [(dataclasses.replace(source, row_groups=(i, i + 1)), size)
                       for i, size in enumerate(sizes)]
        else:
            pieces.append((source, sum(sizes)))
    return pieces


def plan_shards(sources: list[Source], count: int) -> list[list[Source]]:
    """`count` runs of consecutive pieces whose largest is as small as piece boundaries allow,
    every shard at least one piece; adjacent row groups of one file in a shard are joined back
    into one range."""
    pieces = split_pieces(sources)
    if count < 1:
        raise DataError(f"--shards must be >= 1, got {count}")
    if count > len(pieces):
        raise DataError(f"--shards {count}, but the inputs hold only {len(pieces)} pieces (files or "
                        f"Parquet row groups) and a shard never cuts one: use --shards {len(pieces)} or fewer")
    # An empty file still costs a task an open: one byte, so that it also takes a place.
    sizes = [max(size, 1) for _, size in pieces]
    ends = list(accumulate(sizes))
    # The smallest capacity that packs the pieces, in order, into at most `count` shards: the
    # slowest task is as fast as the inputs' order permits.
    low, high = max(sizes), ends[-1]
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(_packed(ends, middle)) <= count else (middle + 1, high)
    bounds = [0, *_packed(ends, low)]
    while len(bounds) - 1 < count:  # fewer were needed: split the largest shards that can be
        bounds = _split_largest(bounds, ends)
    return [_join_row_groups([piece for piece, _ in pieces[a:b]]) for a, b in zip(bounds, bounds[1:])]


def _packed(ends: list[int], capacity: int) -> list[int]:
    """The end (exclusive piece index) of each shard when shards are filled in order up to
    `capacity` bytes (a piece larger than that alone in its shard)."""
    stops, start = [], 0
    while start < len(ends):
        base = ends[start - 1] if start else 0
        start = max(bisect_right(ends, base + capacity), start + 1)
        stops.append(start)
    return stops


def _split_largest(bounds: list[int], ends: list[int]) -> list[int]:
    """Split the shard of most bytes among those of two pieces or more at its byte midpoint."""
    def size(i):
        return ends[bounds[i + 1] - 1] - (ends[bounds[i] - 1] if bounds[i] else 0)

    i = max((i for i in range(len(bounds) - 1) if bounds[i + 1] - bounds[i] > 1), key=size)
    base = ends[bounds[i] - 1] if bounds[i] else 0
    cut = bisect_left(ends, base + size(i) / 2, lo=bounds[i]) + 1
    cut = min(max(cut, bounds[i] + 1), bounds[i + 1] - 1)
    return [*bounds[:i + 1], cut, *bounds[i + 1:]]


def _join_row_groups(pieces: list[Source]) -> list[Source]:
    joined: list[Source] = []
    for piece in pieces:
        last = joined[-1] if joined else None
        if (last is not None and last.path == piece.path and last.row_groups and piece.row_groups
                and last.row_groups[1] == piece.row_groups[0]):
            joined[-1] = dataclasses.replace(last, row_groups=(last.row_groups[0], piece.row_groups[1]))
        else:
            joined.append(piece)
    return joined


def _source_to_json(source: Source) -> dict:
    fields = dataclasses.asdict(source)
    fields["path"] = str(source.path)
    return fields


def _source_from_json(fields: dict) -> Source:
    known = {f.name for f in dataclasses.fields(Source)}
    values = {key: value for key, value in fields.items() if key in known}
    values["path"] = Path(values["path"])
    if values.get("row_groups") is not None:
        values["row_groups"] = tuple(values["row_groups"])
    return Source(**values)


def plan_to_json(plan: ShardPlan) -> dict:
    return {"version": PLAN_VERSION, "tokenizer": plan.tokenizer, "options": plan.options,
            "shards": [[_source_to_json(s) for s in shard] for shard in plan.shards]}


def write_plan(output_dir: str | Path, plan: ShardPlan) -> Path:
    """Write the plan, or keep the one already there when it is the same; a different plan over
    an existing one (other inputs, another shard count or tokenizer) is refused, since shards
    already finished under it would be merged with shards of the new one."""
    path = shards_dir(output_dir) / PLAN_NAME
    wanted = plan_to_json(plan)
    if path.is_file():
        if json.loads(path.read_text()) == wanted:
            return path
        raise DataError(f"{path} holds another plan (other inputs, --shards, tokenizer or keys): "
                        f"remove {path.parent} to start over, or rerun with the same arguments")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{PLAN_NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(wanted, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_plan(output_dir: str | Path) -> ShardPlan:
    path = shards_dir(output_dir) / PLAN_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no shard plan at {path}: bloom-preprocess --slurm writes it") from None
    except ValueError as err:
        raise DataError(f"{path}: not a shard plan ({err})") from None
    if raw.get("version") != PLAN_VERSION:
        raise DataError(f"{path}: plan version {raw.get('version')!r}, this code reads {PLAN_VERSION}")
    shards = [[_source_from_json(s) for s in shard] for shard in raw["shards"]]
    return ShardPlan(shards, raw["tokenizer"], raw["options"])
