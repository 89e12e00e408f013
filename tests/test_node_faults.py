"""What goes wrong on many nodes, made to happen: a node lost mid-run, a rank that stops answering.

Node loss runs on the three-node namespace cluster (tests/slurm/start_cluster.sh --nodes 3): a
two-node DP2 job (one process per node, dropout 0.1) through bloom-slurm. Every process the job
has on its second node is SIGKILLed (the rank, torchrun, the step's slurmstepd: what a dead node
leaves), after the checkpoint of iteration 50. The survivor's heartbeat survey
(parallelism/watchdog.py) names the node in exit.json, the job script requeues the job without it,
the second start runs on the first and third nodes, resumes from `latest`, and its losses are
bitwise those of an uninterrupted DP2 run. Its second node is then killed too, before a newer
checkpoint: that start is not requeued (no crash loop), and the job ends FAILED.

A SIGSTOPped rank (bloom-train's local launcher, two processes): the job ends once the configured
collective timeout has passed, with one line naming the silent rank and its host.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bloom_train import TINY_RUN, data_cache, step_losses  # noqa: F401
from tests.test_launch_slurm import (FINISHED, REPO, _node_ready, _run, end_state, ensure_namespace_cluster,
                                     job_env, job_fields, job_state, submit)

NODES = ("bloomnode1", "bloomnode2", "bloomnode3")  # start_cluster.sh --nodes 3
ITERS, SAVE = 200, 50
TIMEOUT_S = 20  # parallel.collective_timeout_s of the SIGSTOP run: a beat every 2 s, a survey of 6 s
# The node-loss job's: longer, so that a step slowed by a loaded machine is never taken for a
# hang (a killed node's peers fail at once anyway); a beat every 4 s, a survey of 12 s.
LOSS_TIMEOUT_S = 40
STEP_WAIT_S = 10  # bloom-slurm --step-wait: srun waits this long for a lost node's task
# How long a job may take to end once a node is lost: the survey (12 s; a killed node's sockets
# close, so its peers fail at once; a silent one would add LOSS_TIMEOUT_S), srun's --wait, srun's
# step abort (KillWait 5 s + 2), the exit record, and a wide margin for 2 shared cores.
END_BOUND_S = 12 + STEP_WAIT_S + 7 + 60
START_TIMEOUT_S = 240
# torchrun gives each of several processes on a node one thread, a single one all of them: the
# job (one process per node) and the reference (two on one node) must do the same arithmetic.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
RUN = [*TINY_RUN, f"trainer.train_iters={ITERS}", f"trainer.save_interval={SAVE}",
       f"parallel.collective_timeout_s={LOSS_TIMEOUT_S}"]


@pytest.fixture(scope="module")
def three_node_cluster():
    """The three-node namespace cluster, started if its nodes are not all up."""
    return ensure_namespace_cluster(NODES)


def kill_node(node: str) -> list:
    """SIGKILL every process of node `node` but its slurmd: the job's ranks, torchrun and
    slurmstepd die as on a dead node, while the node stays in the cluster for later tests."""
    slurmd = Path(f"/run/slurmd-{node}.pid").read_text().strip()
    pids = [pid for pid in _run("ip", "netns", "pids", node).stdout.split() if pid != slurmd]
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _wait_for(path: Path, predicate, what: str, job_id: str, timeout=START_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.is_file() else ""
        if predicate(text):
            return text
        time.sleep(0.1)
    _run("scancel", job_id)
    pytest.fail(f"job {job_id}: {what} not in {path} after {timeout} s ({job_state(job_id)})\n{text[-3000:]}")


def _host_of_rank_1(placement: str) -> str:
    """From bloom-train's start-up lines: 'host bloomnode2: ranks 1 (pp 0, dp 1, tp 0)'."""
    lines = [line for line in placement.splitlines() if ": ranks 1 (" in line]
    assert lines, placement[-2000:]
    return lines[-1].split("host ")[1].split(":")[0]


def _kill_second_node(out_file: Path, job_id: str, after: str, since: str = "") -> tuple:
    """Once `after` is in the log (after the last `since`), kill the node of rank 1; (node, seconds
    the job took to end)."""
    text = _wait_for(out_file, lambda t: since in t and after in t[t.rindex(since) if since else 0:], repr(after), job_id)
    node = _host_of_rank_1(text)
    assert kill_node(node), f"no processes on {node}"
    killed = time.monotonic()
    while time.monotonic() - killed < END_BOUND_S:
        if job_fields(job_id).get("JobState") not in ("RUNNING", "COMPLETING"):
            return node, time.monotonic() - killed
        time.sleep(0.5)
    _run("scancel", job_id)
    pytest.fail(f"job {job_id} still {job_state(job_id)} {END_BOUND_S} s after {node} was killed")


def _release_requeued(job_id: str) -> dict:
    """A requeued job waits out SLURM's hold (test_launch_slurm._release_when_requeued): start it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") == "PENDING" and fields.get("Restarts") == "1" and _node_ready():
            time.sleep(3)  # the job script's ExcNodeList update lands just after its requeue
            fields = job_fields(job_id)
            _run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            return fields
        if fields.get("JobState") in FINISHED:
            return fields
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not requeued: {job_state(job_id)}")


@pytest.fixture(scope="module")
def node_loss(three_node_cluster, data_cache, tmp_path_factory):
    """The job of the module docstring, and the uninterrupted DP2 reference trained meanwhile."""
    root = tmp_path_factory.mktemp("node_loss")
    run_dir = root / "job"
    overrides = ["launcher.nodes=2", "launcher.gpus_per_node=0", "launcher.nproc_per_node=1",
                 "launcher.time=00:15:00", f"trainer.run_dir={run_dir}", f"data.cache_dir={data_cache}", *RUN]
    job_id = submit(overrides, "--step-wait", str(STEP_WAIT_S), env={**job_env(), **ONE_THREAD})
    reference = subprocess.Popen([sys.executable, "-m", "launch.train_cli", *RUN, "launcher.nproc_per_node=2",
                                  f"trainer.run_dir={root / 'reference'}", f"data.cache_dir={data_cache}"],
                                 cwd=REPO, env={**job_env(), **ONE_THREAD}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    out_file = run_dir / "logs" / f"bloom-tiny-{job_id}.out"
    # First start: lose the second node a few steps after the checkpoint of iteration 50.
    first = _kill_second_node(out_file, job_id, f"[default0]:iter {SAVE + 5}/")
    exit_first = json.loads((run_dir / "exit.json").read_text())
    pending = _release_requeued(job_id)
    # Second start (without the lost node): lose its second node before a newer checkpoint.
    resumed = f"resumed from {run_dir}/checkpoints/iter_{SAVE:08d}"
    second = _kill_second_node(out_file, job_id, f"[default0]:iter {SAVE + 3}/", since=resumed)
    state = end_state(job_id, time.monotonic() + 60) or job_state(job_id)
    reference_out = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, reference_out[-3000:]
    out = out_file.read_text()
    assert resumed in out, out[-3000:]
    return {"job": job_id, "run_dir": run_dir, "out": out, "first": first, "second": second,
            "exit_first": exit_first, "pending": pending, "state": state,
            "fields": job_fields(job_id), "reference": step_losses(root / "reference")}


def test_lost_node_is_named_and_the_job_ends_in_bounded_time(node_loss):
    lost, seconds = node_loss["first"]
    record = node_loss["exit_first"]
    assert lost != NODES[0]  # the batch script's node survives: it decides the requeue
    assert record["reason"] == "node_lost" and record["lost_hosts"] == [lost], record
    assert record["silent_ranks"] == [1] and record["start_iteration"] == 0 and record["iteration"] > SAVE
    lines = [line for line in node_loss["out"].splitlines() if "bloom-slurm: requeueing" in line]
    assert lines == [f"bloom-slurm: requeueing job {node_loss['job']}: the run stopped for node_lost "
                     f"({lost}) at iteration {record['iteration']} and will resume from its checkpoint "
                     f"of iteration {SAVE}"], node_loss["out"][-3000:]
    print(f"job ended {seconds:.0f} s after {lost} was killed (bound {END_BOUND_S} s)")


def test_requeued_without_the_lost_node_and_resumed_bitwise(node_loss):
    job, out = node_loss["job"], node_loss["out"]
    lost = node_loss["first"][0]
    assert node_loss["pending"]["ExcNodeList"] == lost, node_loss["pending"]
    assert f"bloom-slurm: job {job} requeued without {lost}" in out
    second_start = out.split(f"resumed from {node_loss['run_dir']}/checkpoints/iter_{SAVE:08d}")[0]
    second_start = out[out.rindex("placement:", 0, len(second_start)):]
    hosts = {line.split("host ")[1].split(":")[0] for line in second_start.splitlines() if ": ranks " in line}
    assert lost not in hosts and hosts <= set(NODES) and len(hosts) == 2, second_start[:2000]
    got, reference = step_losses(node_loss["run_dir"]), node_loss["reference"]
    after_resume = [step for step in got if step > SAVE]
    assert after_resume and after_resume == list(range(SAVE + 1, max(got) + 1)), sorted(got)
    assert min(got) == 1  # the first start's steps up to the checkpoint are kept, the rest dropped
    for step, (loss, consumed) in got.items():
        assert (loss, consumed) == reference[step], f"step {step}: {loss} vs {reference[step][0]} (bitwise)"


def test_second_loss_without_a_newer_checkpoint_is_not_requeued(node_loss):
    job, out, fields = node_loss["job"], node_loss["out"], node_loss["fields"]
    lost = node_loss["second"][0]
    assert lost not in (NODES[0], node_loss["first"][0])
    assert node_loss["state"].startswith("FAILED"), node_loss["state"]
    assert fields["Restarts"] == "1"
    record = json.loads((node_loss["run_dir"] / "exit.json").read_text())
    assert record["reason"] == "node_lost" and record["lost_hosts"] == [lost] and record["start_iteration"] == SAVE
    assert (f"bloom-slurm: not requeueing job {job}: the run stopped for node_lost ({lost}) at iteration "
            f"{record['iteration']} with no checkpoint newer than iteration {SAVE}") in out, out[-3000:]


# ---- a rank that stops answering (no cluster needed) -------------------------------------------

def _rank_pid(run_dir, rank: int) -> int:
    """The pid of bloom-train rank `rank` of the run writing to run_dir (torchrun's worker)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and f"trainer.run_dir={run_dir}".encode() in cmdline:
            return int(pid)
    raise AssertionError(f"no rank {rank} of {run_dir} running")


def test_sigstopped_rank_is_named_after_the_collective_timeout(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launch.train_cli", *TINY_RUN, "trainer.train_iters=5000",
               "trainer.save_interval=5000", f"parallel.collective_timeout_s={TIMEOUT_S}",
               "launcher.nproc_per_node=2", f"trainer.run_dir={run_dir}", f"data.cache_dir={data_cache}"]
    proc = subprocess.Popen(command, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines, stopped, errors = [], None, []
    try:
        for line in proc.stdout:
            line = re.sub(r"^\[default\d+\]:", "", line)  # torchrun's prefix, when it adds one
            lines.append(line)
            if stopped is None and "iter 5/" in line:
                os.kill(_rank_pid(run_dir, 1), signal.SIGSTOP)
                stopped = time.monotonic()
            if line.startswith("bloom-train: error:"):
                errors.append((time.monotonic() - stopped, line.strip()))
                # The stopped rank ignores torchrun's SIGTERM (30 s until its SIGKILL; srun's
                # would come after KillWait): end it now, the test has what it needs.
                if len(errors) == 1:
                    os.kill(_rank_pid(run_dir, 1), signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert proc.returncode != 0 and stopped is not None, out[-3000:]
    assert len(errors) == 1, out[-5000:]  # one line, not one per rank
    seconds, message = errors[0]
    assert message.startswith(f"bloom-train: error: rank_silent: rank 1 on {socket.gethostname()} silent"), message
    assert f"(timeout {TIMEOUT_S} s)" in message
    assert seconds >= TIMEOUT_S  # the timeout, not a stray error, ended it
    assert "Traceback" not in out.split("bloom-train: error:")[0]  # no stack from a rank before it
    record = json.loads((run_dir / "exit.json").read_text())
    assert record["reason"] == "rank_silent" and record["silent_ranks"] == [1], record


# ---- the survey itself, on a real store in one process ------------------------------------------

def test_survey_names_silent_ranks_and_lost_hosts():
    """Four ranks on hosts a, a, b, b sharing one store: rank 0 surveys while rank 1 beats, rank 2
    beat once and stopped, rank 3 left cleanly: only rank 2 is silent, and host b is not lost
    (rank 3 answered); with rank 3 silent too, b is a lost node."""
    import torch.distributed as dist

    from parallelism.watchdog import Heartbeat

    store, hosts = dist.HashStore(), ["a", "a", "b", "b"]
    beats = [Heartbeat(store, rank, hosts, interval_s=0.2) for rank in range(4)]
    for beat in beats:
        beat._beat("alive")
    beats[1]._thread.start()
    beats[3].stop()
    try:
        silence = beats[0].survey()
        assert [s.rank for s in silence.silent] == [2] and silence.reporter
        assert silence.reason == "rank_silent" and silence.lost_hosts == []
        assert silence.record() == {"silent_ranks": [2], "silent_hosts": ["b"], "lost_hosts": []}
        store.set("bloom/heartbeat/3", store.get("bloom/heartbeat/2"))  # rank 3 stopped, not left
        silence = beats[1].survey()
        assert [s.rank for s in silence.silent] == [0, 2, 3]  # rank 0 does not beat here: no thread
        assert silence.lost_hosts == ["b"] and silence.reason == "node_lost"
        assert silence.reporter  # rank 1, the lowest rank still beating, reports
        message = silence.message(RuntimeError("gloo: Connection reset by peer\nmore"), 20)
        assert message.startswith("node_lost: rank 0 on a silent, its last beat ")
        assert "; node b (ranks 2,3) silent, its last beat " in message
        assert message.endswith("a collective failed (timeout 20 s): gloo: Connection reset by peer")
    finally:
        beats[1].stop()
