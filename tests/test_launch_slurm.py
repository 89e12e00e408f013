"""bloom-train on a real SLURM cluster: the one-node cluster tests/slurm/start_cluster.sh runs on
this machine (Debian's slurm-wlm + munge). Skipped, with the reason, where there is none; but in CI
(CI=true in the environment, as CI services set it) a test cluster that cannot be had is a failure,
not a skip: .ci/run starts one there, and the SLURM tests must run.

Only that cluster is used: a SLURM client that talks to any other cluster (a real one, on a login
node) gets no test jobs.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest

from launch.local import free_port
from tests.bloom_train import TINY_RUN, data_cache  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
START = REPO / "tests" / "slurm" / "start_cluster.sh"
TEST_CLUSTER = "bloomtest"  # ClusterName in the slurm.conf start_cluster.sh writes
JOB_TIMEOUT_S = 180
# The state a finished job keeps in scontrol (there is no accounting database for sacct).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _run(*command, timeout=60):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _cluster_name():
    """The ClusterName of the controller this client reaches, or None when none answers."""
    result = _run("scontrol", "show", "config", timeout=20)
    if result.returncode != 0:
        return None
    for line in result.stdout.splitlines():
        if line.split("=")[0].strip() == "ClusterName":
            return line.split("=", 1)[1].strip()
    return None


def _node_states() -> list:
    result = _run("sinfo", "-h", "-N", "-o", "%t", timeout=20)
    return result.stdout.split() if result.returncode == 0 else []


def _node_ready():
    """A node is free for a job now."""
    return any(state in ("idle", "mix") for state in _node_states())


def _cluster_up():
    """Some node takes jobs, perhaps after others' (a busy multi-node test cluster is not restarted)."""
    return any(state.rstrip("*") in ("idle", "mix", "alloc", "comp") for state in _node_states())


def in_ci(environ=os.environ) -> bool:
    """CI services (GitHub Actions, GitLab CI, ...) set CI=true."""
    return environ.get("CI", "").strip().lower() in ("true", "1")


def no_cluster(reason: str, environ=os.environ):
    """The SLURM tests cannot run here: a skip with the reason, or under CI a failure."""
    if in_ci(environ):
        pytest.fail(f"CI=true, and {reason}", pytrace=False)
    pytest.skip(reason)


SLURM_COMMANDS = ("sbatch", "scontrol", "sinfo")  # what the cluster fixtures and submit() run


def require_slurm_commands() -> None:
    """no_cluster, naming the first SLURM command missing from PATH (which would otherwise end a
    fixture in FileNotFoundError)."""
    missing = [command for command in SLURM_COMMANDS if not shutil.which(command)]
    if missing:
        no_cluster(f"{missing[0]} is not on PATH: `apt-get install -y slurm-wlm munge` and "
                   "`tests/slurm/start_cluster.sh` (as root) to run the SLURM tests")


def ensure_namespace_cluster(nodes) -> tuple:
    """`nodes` of the three-node namespace cluster (start_cluster.sh --nodes 3), started if they do
    not all take jobs (a cluster of other nodes, the one-node one included, is replaced)."""
    require_slurm_commands()
    if _cluster_name() not in (None, TEST_CLUSTER):
        no_cluster(f"this SLURM client reaches cluster {_cluster_name()!r}, not the test cluster "
                   f"{TEST_CLUSTER!r}: no test jobs are sent to it")
    result = _run("sinfo", "-h", "-N", "-o", "%N %t", timeout=20)
    up = {line.split()[0] for line in result.stdout.splitlines()  # taking jobs, now or after the ones they run
          if result.returncode == 0 and line.split()[1].rstrip("*") in ("idle", "mix", "alloc", "comp")}
    if not set(nodes) <= up:
        result = _run(str(START), "--nodes", "3", timeout=120)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            no_cluster(f"the three-node SLURM cluster cannot start: {lines[-1]}")
    return tuple(nodes)


def ensure_test_cluster() -> str:
    """The one-node test cluster's name once it answers, started if need be (no_cluster if not)."""
    require_slurm_commands()
    name = _cluster_name()
    if name not in (None, TEST_CLUSTER):
        no_cluster(f"this SLURM client reaches cluster {name!r}, not the one-node test cluster "
                   f"{TEST_CLUSTER!r}: no test jobs are sent to it")
    if name is None or not _cluster_up():
        # Idempotent, and refuses to replace a slurm.conf it did not write.
        result = _run(str(START), timeout=90)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            no_cluster(f"the one-node SLURM cluster cannot start: {lines[-1]}")
    return TEST_CLUSTER


@pytest.fixture(scope="module")
def slurm_cluster():
    return ensure_test_cluster()


# ---- the decision, without a cluster: skip here, fail under CI ---------------------------------

def assert_outcome(expected, reason: str, call) -> None:
    """call() ends in a pytest skip or failure: the expected one, naming the reason. (Caught
    either way, so that a wrong skip fails this test rather than skipping it.)"""
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as raised:
        call()
    got = raised.value
    assert isinstance(got, expected), f"{type(got).__name__} ({got.msg}), expected {expected.__name__}"
    assert reason in got.msg
    assert got.msg.startswith("CI=true, and ") == (expected is pytest.fail.Exception)


@pytest.mark.parametrize("ci,fails", [("true", True), ("TRUE", True), ("1", True), (None, False),
                                      ("false", False), ("", False)])
def test_no_cluster_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, fails):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    # A machine where the cluster does not start: no controller answers, start_cluster.sh fails.
    monkeypatch.setattr(shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    calls = []

    def fake_run(*command, timeout=60):
        calls.append(command)
        if command[0] == str(START):
            return subprocess.CompletedProcess(command, 1, "", "start_cluster.sh: error: slurmd died\n")
        return subprocess.CompletedProcess(command, 1, "", "Unable to contact slurm controller")

    monkeypatch.setattr(sys.modules[__name__], "_run", fake_run)
    outcome = pytest.fail.Exception if fails else pytest.skip.Exception
    assert_outcome(outcome, "the one-node SLURM cluster cannot start: "
                            "start_cluster.sh: error: slurmd died", ensure_test_cluster)
    assert (str(START),) in calls  # it did try to start the cluster
    # No SLURM at all (running one of its commands would raise FileNotFoundError): the same
    # decision, from the one-node fixture and from the namespace cluster's (multinode, node faults).
    monkeypatch.setattr(shutil, "which", lambda cmd: None)

    def no_such_command(*command, timeout=60):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(sys.modules[__name__], "_run", no_such_command)
    assert_outcome(outcome, "sbatch is not on PATH", ensure_test_cluster)
    assert_outcome(outcome, "sbatch is not on PATH", lambda: ensure_namespace_cluster(("bloomnode1", "bloomnode2")))
    # sbatch there but not scontrol: named too.
    monkeypatch.setattr(shutil, "which", lambda cmd: None if cmd == "scontrol" else f"/usr/bin/{cmd}")
    assert_outcome(outcome, "scontrol is not on PATH", lambda: ensure_namespace_cluster(("bloomnode1", "bloomnode2")))


def test_no_cluster_is_decided_by_ci_alone():
    for environ, expected in [({"CI": "true"}, pytest.fail.Exception), ({}, pytest.skip.Exception),
                              ({"CI": "no"}, pytest.skip.Exception)]:
        assert_outcome(expected, "some reason", lambda: no_cluster("some reason", environ))


CI_STUBS = {  # commands .ci/run calls, each a script printing its name and arguments
    "id": 'echo 0',  # root
    "apt-get": 'echo "apt-get $*"',
    "sbatch": 'true',
    "python3": 'mkdir -p .venv/bin && printf "pip() { :; }\\npython() { echo PYTEST-RAN; }\\n" > .venv/bin/activate',
}


def _ci_run(tmp_path, start_ok: bool, ci):
    """.ci/run in a copy of its tree with stub commands: start_cluster.sh succeeds or fails."""
    tree = tmp_path / ("ok" if start_ok else "fails") / str(ci)
    (tree / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", tree / ".ci" / "run")
    start = tree / "tests" / "slurm" / "start_cluster.sh"
    start.parent.mkdir(parents=True)
    start.write_text("#!/bin/sh\n" + ("echo started\n" if start_ok else
                                       "echo 'start_cluster.sh: error: slurmd died' >&2; exit 1\n"))
    bin_dir = tree / "bin"
    bin_dir.mkdir()
    for name, body in CI_STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    for path in [start, *bin_dir.iterdir()]:
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(["bash", str(tree / ".ci" / "run")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("ci", ["true", None], ids=["CI=true", "no-CI"])
def test_ci_run_fails_when_the_cluster_cannot_start_under_ci(tmp_path, ci):
    failed = _ci_run(tmp_path, start_ok=False, ci=ci)
    if ci == "true":
        assert failed.returncode != 0 and "PYTEST-RAN" not in failed.stdout
        assert "SLURM test cluster did not start" in failed.stderr, failed.stderr
    else:
        assert failed.returncode == 0, failed.stderr
        assert "tests/test_launch_slurm.py will skip" in failed.stdout and "PYTEST-RAN" in failed.stdout
    started = _ci_run(tmp_path, start_ok=True, ci=ci)
    assert started.returncode == 0 and "started" in started.stdout and "PYTEST-RAN" in started.stdout


def job_env():
    # sbatch and srun pass the submitter's environment to the job: the job's python must find
    # this checkout's packages whether or not it is pip-installed.
    return dict(os.environ, PYTHONPATH=str(REPO))


def submit(overrides: list, *options: str, env: Optional[dict] = None, port: Optional[int] = None) -> str:
    """`bloom-slurm --submit` (a free rendezvous port unless given, then `options`) with these
    overrides, from this checkout; the job id."""
    submitted = subprocess.run([sys.executable, "-m", "launch.slurm", "--submit", "--port", str(port or free_port()),
                                *options, *overrides],
                               cwd=REPO, env=env or job_env(), capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def job_logs(run_dir: Path, job_id: str) -> tuple:
    """(stdout, stderr) of the job's batch script, from the run's logs folder."""
    logs = run_dir / "logs"
    return (logs / f"bloom-tiny-{job_id}.out").read_text(), (logs / f"bloom-tiny-{job_id}.err").read_text()


def job_fields(job_id: str) -> dict:
    result = _run("scontrol", "show", "job", "-o", job_id)
    return dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)


def job_state(job_id: str) -> str:
    fields = job_fields(job_id)
    return f"{fields.get('JobState', 'UNKNOWN')} exit {fields.get('ExitCode', '?')}"


def end_state(job_id: str, deadline: float) -> Optional[str]:
    """The job's final state, or None when it had not finished by `deadline` (it is cancelled)."""
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state.split()[0] in FINISHED:
            return state
        time.sleep(1)
    _run("scancel", job_id)
    return None


def wait_for(job_id: str) -> str:
    state = end_state(job_id, time.monotonic() + JOB_TIMEOUT_S)
    if state is None:
        pytest.fail(f"job {job_id} not finished after {JOB_TIMEOUT_S} s: {job_state(job_id)}")
    return state


def test_bloom_slurm_submit_runs_a_two_process_dry_run(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["launcher.nodes=1", "launcher.gpus_per_node=0", "launcher.nproc_per_node=2",
                 "launcher.time=00:05:00", "trainer.dry_run=true", f"trainer.run_dir={run_dir}"]
    # A free rendezvous port rather than BigScience's 6000, which a CI machine may be using.
    port = free_port()
    job_id = submit(overrides, port=port)
    assert job_id.isdigit(), job_id
    state = wait_for(job_id)
    out, err = job_logs(run_dir, job_id)
    assert state == "COMPLETED exit 0:0", f"job {job_id}: {state}\n{out[-2000:]}\n{err[-3000:]}"
    assert f"bloom-slurm: job {job_id}, 1 node(s) x 2 process(es), rendezvous at " in out
    assert out.split("rendezvous at ")[1].split()[0].endswith(f":{port}")
    assert (run_dir / "plan.json").is_file()
    assert (run_dir / "bloom-slurm.sbatch").is_file()


SRUN_TASK = textwrap.dedent("""
    import torch, torch.distributed as dist
    from launch.env import distributed_env, export_torch_env
    from parallelism.topology import init_process_group

    env = distributed_env()
    export_torch_env(env)
    init_process_group("gloo", timeout_s=120)
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)
    print(f"task {env.source} {env.rank}/{env.world_size} local {env.local_rank} "
          f"at {env.master_addr}:{env.master_port} sum {total.item()}", flush=True)
    dist.destroy_process_group()
""")


def test_bare_srun_tasks_form_one_group(slurm_cluster):
    """`srun -n 2 python ...`: no torchrun, the tasks find each other from SLURM's variables."""
    result = subprocess.run(["srun", "-n", "2", "--time=3", "--kill-on-bad-exit=1",
                             sys.executable, "-c", SRUN_TASK], cwd=REPO, env=job_env(),
                            capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("task "))
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("task slurm 0/2 local 0 at ") and lines[0].endswith(" sum 3.0")
    assert lines[1].startswith("task slurm 1/2 local 1 at ") and lines[1].endswith(" sum 3.0")
    # both derived the same rendezvous point on their own
    assert lines[0].split(" at ")[1] == lines[1].split(" at ")[1]


def _wait_for_line(path: Path, prefix: str, job_id: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.is_file() and any(line.startswith(prefix) for line in path.read_text().splitlines()):
            return
        time.sleep(0.2)
    _run("scancel", job_id)
    pytest.fail(f"job {job_id}: no line starting {prefix!r} in {path} after {JOB_TIMEOUT_S} s")


def _release_when_requeued(job_id: str) -> None:
    """SLURM holds a requeued job for its credential lifetime (two minutes: slurmd refuses a
    credential of the job created in the second it revoked the last one); once the first start
    has left the node and that second is past, start it now instead."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") == "PENDING" and fields.get("Restarts", "0") != "0" and _node_ready():
            time.sleep(3)
            _run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            return
        if fields.get("JobState") in FINISHED:
            return  # not requeued: the assertions below say so
        time.sleep(0.5)


def test_time_limit_signal_requeues_the_job_and_the_run_finishes(slurm_cluster, tmp_path, data_cache):
    """The time limit's SIGUSR1 (sent here with scancel --signal, as --signal=USR1@120 would):
    the run saves and stops, the job script requeues the job, the second start resumes from that
    checkpoint and finishes, and a finished run is not requeued again."""
    run_dir, iters = tmp_path / "run", 400
    overrides = ["launcher.nodes=1", "launcher.gpus_per_node=0", "launcher.nproc_per_node=1",
                 "launcher.time=00:10:00", f"trainer.run_dir={run_dir}", f"data.cache_dir={data_cache}",
                 *TINY_RUN, f"trainer.train_iters={iters}", f"trainer.save_interval={iters}"]
    job_id = submit(overrides)
    out_file = run_dir / "logs" / f"bloom-tiny-{job_id}.out"
    _wait_for_line(out_file, "[default0]:iter 2/", job_id)
    assert _run("scancel", "--signal=USR1", job_id).returncode == 0
    _release_when_requeued(job_id)
    state = wait_for(job_id)
    out, err = job_logs(run_dir, job_id)
    assert state == "COMPLETED exit 0:0", f"job {job_id}: {state}\n{out[-3000:]}\n{err[-3000:]}"
    assert job_fields(job_id)["Restarts"] == "1"
    stopped = [line for line in out.splitlines() if "stopping at iteration" in line]
    assert len(stopped) == 1 and stopped[0].endswith("signal received (SIGUSR1)"), out[-3000:]
    at = int(stopped[0].split("stopping at iteration ")[1].split(":")[0])
    assert 2 <= at < iters
    assert f"bloom-slurm: requeueing job {job_id}: the run stopped for SIGUSR1 at iteration {at}" in out
    assert f"resumed from {run_dir}/checkpoints/iter_{at:08d} at iteration {at}" in out
    assert f"bloom-slurm: not requeueing job {job_id}: the run stopped for 'finished'" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{iters:08d}"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "lm_loss" in line]
    assert steps == list(range(1, iters + 1))  # every step once, none lost or repeated


def test_parallel_auto_under_slurm_runs_the_planners_winner(slurm_cluster, tmp_path, data_cache):
    """parallel.auto=true through bloom-slurm: the batch script, srun and every rank load the
    config and take the same winner, which trains."""
    import yaml

    from tests.test_parallel_auto import chosen, configured
    from training.config.loader import load_config
    from training.plan.planner import plan

    run_dir = tmp_path / "run"
    overrides = ["launcher.nodes=1", "launcher.gpus_per_node=0", "launcher.nproc_per_node=2",
                 "launcher.time=00:05:00", f"trainer.run_dir={run_dir}", f"data.cache_dir={data_cache}",
                 *TINY_RUN, "trainer.train_iters=2", "parallel.auto=true"]
    winner = plan(load_config(overrides)).ranked[0].layout
    # auto changes the run: the winner is not what the config says without it
    assert chosen(winner) != configured(load_config(overrides), 2), "auto would change nothing here"
    job_id = submit(overrides)
    state = wait_for(job_id)
    out, err = job_logs(run_dir, job_id)
    assert state == "COMPLETED exit 0:0", f"job {job_id}: {state}\n{out[-2000:]}\n{err[-3000:]}"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    p, t = resolved["parallel"], resolved["trainer"]
    assert (p["tp"], p["pp"], p["dp"], t["micro_batch_size"], resolved["model"]["recompute"], p["sequence_parallel"],
            p["zero_stage"]) == chosen(winner)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "lm_loss" in line]
    assert steps == [1, 2]
