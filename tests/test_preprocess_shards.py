"""Sharded preprocessing without SLURM: the plan, the shard tasks and the merge, run here one after
the other, against a one-machine run of the same inputs (tests/test_preprocess_slurm.py runs the
same code as a SLURM array job over the namespace cluster's nodes).
"""
import itertools
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from data.paths import SHIPPED_CORPUS
from data.preprocess_run import PreprocessOptions, preprocess
from data.records import RecordKeys
from data.shard_merge import main as merge_main
from data.shard_merge import merge_shards
from data.shard_plan import ShardPlan, plan_shards, read_plan, shard_name, shards_dir, split_pieces, write_plan
from data.shard_task import run_shard
from data.errors import DataError
from data.sources import expand_inputs
from tests.test_data_helpers import tokenizer_dir  # noqa: F401

SHARDS = 6
BAD_LINES = [b"\xff\xfe not utf-8\n", b"[1, 2]\n", b'{"lang": "en"}\n', b'{"text": "   ", "lang": "en"}\n']


def corpus_inputs(root: Path) -> list[Path]:
    """The shipped corpus and a file of bad lines, one of each kind, between two good ones."""
    bad = root / "bad" / "zz-bad.jsonl"
    bad.parent.mkdir(parents=True)
    good = b'{"text": "a good line", "lang": "en"}\n'
    bad.write_bytes(good + b"".join(BAD_LINES) + good)
    return [SHIPPED_CORPUS, bad.parent]


def plan_options() -> dict:
    return {"text_key": "text", "lang_key": "lang", "group_by": "lang", "strict": False, "chunk_bytes": 1 << 18}


def sharded_run(inputs, tokenizer, out: Path, shards: int = SHARDS) -> dict:
    """What the SLURM job does, in this process: plan, every task, the merge."""
    plan = ShardPlan(plan_shards(expand_inputs(inputs), shards), str(tokenizer), plan_options())
    write_plan(out, plan)
    for index in range(shards):
        run_shard(out, index, workers=1)
    return merge_shards(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    """(one-machine output dir, sharded output dir) over the same inputs."""
    root = tmp_path_factory.mktemp("shards")
    inputs = corpus_inputs(root)
    reference = root / "one-machine"
    preprocess(inputs, tokenizer_dir, reference, PreprocessOptions(keys=RecordKeys(), progress=False))
    sharded = root / "sharded"
    sharded_run(inputs, tokenizer_dir, sharded)
    return reference, sharded


def output_files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in (".bin", ".idx")}


def test_merged_shards_are_byte_for_byte_the_one_machine_run(runs):
    reference, sharded = runs
    expected = output_files(reference)
    assert len(expected) >= 2 * 38 and output_files(sharded) == expected


def test_merged_summary_counts_what_the_one_machine_run_counts(runs):
    reference, sharded = runs
    one, merged = (json.loads((d / "summary.json").read_text()) for d in runs)
    assert merged["total"] == one["total"] and merged["total"]["skipped"] == len(BAD_LINES)
    assert merged["shards"] == SHARDS and merged["inputs"] == one["inputs"]
    for name, stats in one["outputs"].items():
        got = merged["outputs"][name]
        assert {k: got[k] for k in ("documents", "tokens", "skipped", "skipped_total")} == \
               {k: stats[k] for k in ("documents", "tokens", "skipped", "skipped_total")}, name
        assert sorted(got["skipped_lines"]) == sorted(stats["skipped_lines"])
        assert got["prefix"] == (str(sharded / name) if stats["documents"] else None)


def test_plan_is_consecutive_pieces_balanced_by_bytes(tmp_path):
    """Every piece once, in input order, no shard empty, and the largest shard as small as a
    brute force over every way to cut 11 files of random sizes into 4 runs finds it."""
    rng = random.Random(7)
    for i in range(11):
        size = rng.choice([50, 400, 3000, 20000])
        (tmp_path / f"{i:02d}.jsonl").write_text('{"text": "%s"}\n' % ("x" * size))
    sources = expand_inputs([tmp_path])
    shards = plan_shards(sources, 4)
    assert [s for shard in shards for s in shard] == [piece for piece, _ in split_pieces(sources)]
    assert len(shards) == 4 and all(shards)
    sizes = [os.path.getsize(s.path) for s in sources]
    best = min(max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes))))
               for cuts in itertools.combinations(range(1, len(sizes)), 3))
    assert max(sum(os.path.getsize(s.path) for s in shard) for shard in shards) == best


def test_plan_refuses_more_shards_than_pieces(tmp_path):
    sources = expand_inputs([SHIPPED_CORPUS])
    with pytest.raises(DataError, match=f"only {len(sources)} pieces"):
        plan_shards(sources, len(sources) + 1)
    with pytest.raises(DataError, match="--shards must be >= 1"):
        plan_shards(sources, 0)


def test_plan_on_disk_is_kept_and_another_is_refused(tmp_path, tokenizer_dir):
    sources = expand_inputs([SHIPPED_CORPUS])
    plan = ShardPlan(plan_shards(sources, 3), str(tokenizer_dir), plan_options())
    write_plan(tmp_path, plan)
    write_plan(tmp_path, plan)  # the same again: a rerun of the job
    assert read_plan(tmp_path) == plan
    other = ShardPlan(plan_shards(sources, 4), str(tokenizer_dir), plan_options())
    with pytest.raises(DataError, match="holds another plan"):
        write_plan(tmp_path, other)


def test_finished_shard_is_kept_and_a_killed_ones_leftovers_removed(tmp_path, tokenizer_dir):
    sources = expand_inputs([SHIPPED_CORPUS])
    write_plan(tmp_path, ShardPlan(plan_shards(sources, 3), str(tokenizer_dir), plan_options()))
    assert run_shard(tmp_path, 0, workers=1) is not None
    done = shards_dir(tmp_path) / shard_name(0) / "summary.json"
    before = done.stat().st_mtime_ns
    assert run_shard(tmp_path, 0, workers=1) is None and done.stat().st_mtime_ns == before
    leftover = shards_dir(tmp_path) / f"{shard_name(1)}.tmp-deadhost-1"
    leftover.mkdir()
    (leftover / "en.bin").write_bytes(b"partial")
    run_shard(tmp_path, 1, workers=1)
    assert not leftover.exists() and (shards_dir(tmp_path) / shard_name(1) / "summary.json").is_file()


def test_merge_refuses_a_missing_or_incomplete_shard_in_one_line(runs, tmp_path, capsys):
    _, sharded = runs
    broken = tmp_path / "broken"
    shutil.copytree(sharded / "shards", broken / "shards")
    shard3 = broken / "shards" / shard_name(3)
    truncated = next(p for p in sorted(shard3.glob("*.bin")) if p.stat().st_size > 2)
    truncated.write_bytes(truncated.read_bytes()[:-2])
    assert merge_main([str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"shard 3 of {SHARDS}" in err[0] and "incomplete" in err[0], err
    shutil.rmtree(shard3)
    assert merge_main([str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"shard 3 of {SHARDS}" in err[0] and "missing" in err[0], err
    assert not (broken / "summary.json").exists() and not list(broken.glob("*.bin"))


def test_parquet_cut_at_row_groups_merges_to_the_one_machine_bytes(tmp_path, tokenizer_dir):
    """Two Parquet files of many row groups: shards cut inside a file, at row-group boundaries,
    and the merge still gives the one-machine run's bytes."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    docs = [json.loads(line) for path in sorted(SHIPPED_CORPUS.rglob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]
    table = pa.table({"text": [d["text"] for d in docs], "lang": [d["lang"] for d in docs]})
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    half = len(docs) // 2
    pq.write_table(table.slice(0, half), corpus / "a.parquet", row_group_size=25)
    pq.write_table(table.slice(half), corpus / "b.parquet", row_group_size=25)
    reference = tmp_path / "one-machine"
    preprocess([corpus], tokenizer_dir, reference, PreprocessOptions(progress=False))
    sharded_run([corpus], tokenizer_dir, tmp_path / "sharded", shards=5)
    plan = read_plan(tmp_path / "sharded")
    assert any(piece.row_groups and piece.row_groups[0] > 0 for shard in plan.shards for piece in shard)
    assert output_files(tmp_path / "sharded") == output_files(reference) != {}
