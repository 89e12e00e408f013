"""launch/local.py: bloom-train re-run under real torchrun on this machine (2 processes, gloo)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch.local import relaunch_with_torchrun, torchrun_command

REPO = Path(__file__).resolve().parent.parent

# Each worker checks it was started by torchrun, joins the group over gloo and writes what it saw
# to <out>/rank<N>; argv[1] is the output directory (passed as an "override"), argv[2] a mode.
ENTRY = textwrap.dedent("""
    import os, sys, time
    import torch, torch.distributed as dist
    from launch.env import distributed_env

    out, mode = sys.argv[1], sys.argv[2]
    env = distributed_env()
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(minutes=2))
    rank = dist.get_rank()
    print(f"hello from rank {rank}", flush=True)
    if mode == "crash" and rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    if mode == "sleep":
        open(os.path.join(out, f"ready{rank}"), "w").write(str(os.getpid()))
        time.sleep(300)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # in crash mode rank 0 waits here for a peer that is gone
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(f"{env.source} {env.rank} {env.world_size} {env.local_rank} {total.item()}")
    dist.destroy_process_group()
""")


@pytest.fixture
def entry(tmp_path):
    path = tmp_path / "entry.py"
    path.write_text(ENTRY)
    return str(path)


def test_two_ranks_all_reduce_and_only_rank_0_talks(entry, tmp_path, capfd):
    status = relaunch_with_torchrun(2, [str(tmp_path), "ok"], entry=entry, all_ranks=False,
                                    log_dir=str(tmp_path / "logs"))
    assert status == 0
    assert sorted(p.read_text() for p in tmp_path.glob("rank*")) == [
        "torchrun 0 2 0 3.0", "torchrun 1 2 1 3.0"]
    console = capfd.readouterr()
    assert "hello from rank 0" in console.out and "hello from rank 1" not in console.out + console.err
    # rank 1's output is not lost, only kept off the console
    assert any("hello from rank 1" in p.read_text() for p in (tmp_path / "logs").rglob("stdout.log"))


def test_crashed_rank_ends_the_run_nonzero_without_hanging(entry, tmp_path, capfd):
    start = time.monotonic()
    status = relaunch_with_torchrun(2, [str(tmp_path), "crash"], entry=entry, all_ranks=False)
    elapsed = time.monotonic() - start
    assert status != 0 and elapsed < 60  # the gloo timeout is 2 minutes: no one waited for it
    assert not list(tmp_path.glob("rank*"))
    err = capfd.readouterr().err
    log_dir = err.split("every rank's output is under ")[1].split()[0]
    assert any("rank 1 fails on purpose" in p.read_text() for p in Path(log_dir).rglob("stderr.log"))


def test_sigterm_reaches_every_rank(entry, tmp_path):
    """SIGTERM to bloom-train (what SLURM or a Ctrl-C would send) stops torchrun and its workers."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from launch.local import relaunch_with_torchrun as r; "
         f"sys.exit(r(2, [{str(tmp_path)!r}, 'sleep'], entry={entry!r}))"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("ready*"))) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in tmp_path.glob("ready*")]
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    for pid in workers:
        assert not _alive(pid), f"worker {pid} outlived the launcher"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead; it only waits for its parent (pid 1 here) to reap it.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[1].split()[0] != "Z"


def test_command_flags():
    command = torchrun_command(8, ["experiment=bloom-7b1"], port=29501, all_ranks=False)
    assert command[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "1",
                           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29501",
                           "--max_restarts", "0", "--local-ranks-filter", "0",
                           "-m", "launch.train_cli", "experiment=bloom-7b1"]
    assert "--local-ranks-filter" not in torchrun_command(2, [], all_ranks=True)
