"""bloom-preprocess --slurm on the three-node namespace cluster (tests/slurm/start_cluster.sh --nodes
3): `--shards 6 --nodes 3 --submit` runs the shard tasks as an array job over the three nodes and
the merge after them. The merged files are byte for byte a one-machine run's on the same inputs;
a shard task SIGKILLed mid-shard (scancel --signal=KILL) leaves nothing the merge reads and
cancels the merge; the same command again redoes that shard only and merges; the merge refuses
a deleted shard in one line. Skipped with the reason where the cluster cannot be had (a failure
under CI=true), as the other SLURM tests.
"""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.paths import SHIPPED_CORPUS
from data.preprocess_run import PreprocessOptions, preprocess
from data.shard_plan import read_plan, shard_name, shards_dir
from tests.test_data_helpers import tokenizer_dir  # noqa: F401
from tests.test_launch_slurm import REPO, end_state, ensure_namespace_cluster, job_env, job_state

NODES = ("bloomnode1", "bloomnode2", "bloomnode3")
SHARDS = 6
BIG_MB = 24  # tokenized in several seconds: a task that can be killed mid-shard
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cluster():
    return ensure_namespace_cluster(NODES)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list:
    """The shipped corpus, and one large file of its documents repeated (its own shard)."""
    big = tmp_path_factory.mktemp("big-input") / "big.jsonl"
    lines = [line for path in sorted(SHIPPED_CORPUS.rglob("*.jsonl")) for line in path.read_bytes().splitlines(True)]
    with open(big, "wb") as handle:
        while handle.tell() < BIG_MB << 20:
            handle.writelines(lines)
    return [SHIPPED_CORPUS, big]


def bloom_preprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.preprocess", *args], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=120)


def submit(inputs, tokenizer, out) -> dict:
    result = bloom_preprocess("--input", *map(str, inputs), "--tokenizer", str(tokenizer), "--output-dir", str(out),
                              "--slurm", "--shards", str(SHARDS), "--nodes", "3", "--workers", "2", "--submit")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait(job_id: str) -> str:
    state = end_state(job_id, time.monotonic() + TIMEOUT_S)
    assert state is not None, f"job {job_id} did not finish in {TIMEOUT_S} s"
    return state


def task_logs(out: Path, array_job: str) -> dict:
    """shard index -> its task's log, for one start of the array job."""
    logs = shards_dir(out) / "logs"
    return {int(p.stem.rsplit("_", 1)[1]): p.read_text() for p in logs.glob(f"bloom-preprocess-{array_job}_*.out")}


def outputs(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin")) + sorted(directory.glob("*.idx"))}


def kill_when_started(out: Path, array_job: str, index: int) -> None:
    """SIGKILL shard `index`'s task once it is writing (its aside directory exists)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not list(shards_dir(out).glob(f"{shard_name(index)}.tmp-*")):
        assert time.monotonic() < deadline, f"shard {index} never started"
        assert not (shards_dir(out) / shard_name(index)).exists(), f"shard {index} finished before the kill"
        time.sleep(0.05)
    kill = subprocess.run(["scancel", "--signal=KILL", "--full", f"{array_job}_{index}"],
                          capture_output=True, text=True, timeout=30)
    assert kill.returncode == 0, kill.stderr


def test_sharded_job_over_three_nodes_survives_a_killed_task(cluster, inputs, tokenizer_dir, tmp_path):
    out = tmp_path / "processed"
    first = submit(inputs, tokenizer_dir, out)
    big_shard = next(i for i, shard in enumerate(read_plan(out).shards) if shard[0].path == inputs[1])
    kill_when_started(out, first["array_job"], big_shard)
    reference = tmp_path / "one-machine"
    preprocess(inputs, tokenizer_dir, reference, PreprocessOptions(workers=2, progress=False))
    wait(first["array_job"])
    assert wait(first["merge_job"]).startswith("CANCELLED"), job_state(first["merge_job"])
    assert not (shards_dir(out) / shard_name(big_shard)).exists()
    assert not (out / "summary.json").exists() and not list(out.glob("*.bin"))
    finished = {i: (shards_dir(out) / shard_name(i) / "summary.json").stat().st_mtime_ns
                for i in range(SHARDS) if i != big_shard}

    second = submit(inputs, tokenizer_dir, out)  # the same command: the job rerun
    assert wait(second["merge_job"]).startswith("COMPLETED"), job_state(second["merge_job"])
    assert outputs(out) == outputs(reference) and len(outputs(out)) >= 2 * 38
    logs = task_logs(out, second["array_job"])
    assert sorted(logs) == list(range(SHARDS))
    for index, log in logs.items():
        kept = "finished by an earlier start, kept" in log
        assert kept == (index != big_shard), (index, log)
    assert {i: (shards_dir(out) / shard_name(i) / "summary.json").stat().st_mtime_ns for i in finished} == finished
    all_logs = [*task_logs(out, first["array_job"]).values(), *logs.values()]
    hosts = {host for log in all_logs for host in re.findall(r" on (bloomnode\d)", log)}
    assert hosts == set(NODES), hosts  # the tasks ran over the three nodes
    summary = json.loads((out / "summary.json").read_text())
    one = json.loads((reference / "summary.json").read_text())
    assert summary["total"] == one["total"] and summary["shards"] == SHARDS

    shutil.rmtree(shards_dir(out) / shard_name(2))
    merge = subprocess.run(["sbatch", "--parsable", "--wait", str(shards_dir(out) / "preprocess-merge.sbatch")],
                           env=job_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert merge.returncode != 0
    log = (shards_dir(out) / "logs" / f"bloom-preprocess-merge-{merge.stdout.strip()}.out").read_text()
    errors = [line for line in log.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: shard 2 of 6") and "missing" in errors[0], log
