"""Run bloom-train in N processes on this machine by re-starting it under torchrun.

`bloom-train launcher.nproc_per_node=4 ...` typed by hand has no launcher around it; rather than
asking users to spell out torchrun's flags, the command re-runs itself under
`python -m torch.distributed.run` and waits for it. torchrun with --max_restarts 0 stops every
worker as soon as one fails, so a crashed rank ends the whole run with a non-zero status instead of
leaving the others blocked in a collective.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import List, Mapping, Optional, Sequence

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def show_all_ranks(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("BLOOM_ALL_RANKS", "").lower() in ("1", "true", "yes")


def torchrun_command(nproc: int, overrides: Sequence[str], *, entry: str = "launch.train_cli",
                     port: Optional[int] = None, all_ranks: bool = False,
                     log_dir: Optional[str] = None, python: str = sys.executable) -> List[str]:
    """The torchrun command line; `entry` is a module name, or a path ending in .py."""
    command = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--nnodes", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port or free_port()}", "--max_restarts", "0"]
    if not all_ranks:
        # The ranks print the same lines; rank 0's are enough. The others still land in log_dir.
        command += ["--local-ranks-filter", "0"]
    if log_dir:
        command += ["--log-dir", str(log_dir), "--tee", "3"]
    command += [entry] if entry.endswith(".py") else ["-m", entry]
    return command + list(overrides)


def run_forwarding_signals(command: Sequence[str], env: Optional[Mapping[str, str]] = None) -> int:
    """Run command in its own process group, pass SIGINT/SIGTERM on to that group, and return its
    exit status (128 + signal number when a signal ended it, as a shell would report)."""
    # Its own session, so a Ctrl-C in the terminal reaches torchrun once (from us), not twice.
    child = subprocess.Popen(list(command), env=None if env is None else dict(env),
                             start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass  # already gone; wait() below collects it

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


def relaunch_with_torchrun(nproc: int, overrides: Sequence[str], *, entry: str = "launch.train_cli",
                           all_ranks: Optional[bool] = None, log_dir: Optional[str] = None,
                           env: Optional[Mapping[str, str]] = None) -> int:
    """Run `entry overrides` in nproc processes on this machine; return the combined exit status
    (0 only when every rank exited 0). all_ranks defaults to env BLOOM_ALL_RANKS. Unless all
    ranks are shown, every rank's output is also kept under log_dir (a temporary directory when
    not given), which a failure names."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be at least 1")
    all_ranks = show_all_ranks(os.environ if env is None else env) if all_ranks is None else all_ranks
    if log_dir is None and not all_ranks:
        # Rank 0 alone on the console hides the rank that actually failed: keep every rank's output.
        log_dir = tempfile.mkdtemp(prefix="bloom-ranks-")
    command = torchrun_command(nproc, overrides, entry=entry, all_ranks=all_ranks, log_dir=log_dir)
    status = run_forwarding_signals(command, env)
    if status != 0 and log_dir and not all_ranks:
        print(f"bloom-train: a rank failed (exit {status}); every rank's output is under {log_dir}",
              file=sys.stderr)
    return status
