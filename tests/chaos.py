"""Crash a running multi-process bloom-train the way a power cut or the OOM killer would, at a
moment chosen by what its files show, and look at those files while nothing moves.

bloom-train with launcher.nproc_per_node > 1 runs torchrun, which starts each rank in a session of
its own, so no single process group holds the run: `freeze` walks the process tree under the
launcher (from /proc) and SIGSTOPs all of it, until every process is seen stopped; the test then
inspects the checkpoint directory, and `kill` SIGKILLs the whole frozen tree (`thaw` lets it go on
when the moment had already passed). A checkpoint write is in progress while its hidden staging
directory `.iter_N.partial` (training/checkpoint/files.py: staging_dir) holds files this launch
wrote: one left by an earlier kill holds only older files until the next save removes it.
"""
import json
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

STAGING_PREFIX, STAGING_SUFFIX = ".iter_", ".partial"


# -- the process tree -------------------------------------------------------------------------

def _proc_stat(pid: int) -> Optional[tuple]:
    """(state letter, parent pid) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def process_tree(root: int) -> list:
    """root and every process under it."""
    children = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                children[stat[1]].append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _signal_all(pids, signum) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _settled(pid: int, states: str) -> bool:
    stat = _proc_stat(pid)
    return stat is None or stat[0] in states


def freeze(root: int, timeout_s: float = 30.0) -> list:
    """SIGSTOP root's whole tree and wait until each process is really stopped (a signal lands
    when the process next leaves the kernel: an fsync in flight finishes first). Returns the pids."""
    stopped: set = set()
    deadline = time.monotonic() + timeout_s
    while True:
        new = set(process_tree(root)) - stopped
        if not new:
            break
        _signal_all(new, signal.SIGSTOP)
        stopped |= new
    while not all(_settled(pid, "TtZX") for pid in stopped):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {sorted(stopped)} did not all stop within {timeout_s} s")
        time.sleep(0.001)
    return sorted(stopped)


def thaw(pids) -> None:
    _signal_all(pids, signal.SIGCONT)


def kill(popen, pids, timeout_s: float = 30.0) -> None:
    """SIGKILL every pid (stopped ones die too), reap the launcher, and wait until no process of
    the tree is left alive (a zombie waiting for a reaper that is not us counts as dead)."""
    _signal_all(pids, signal.SIGKILL)
    popen.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while not all(_settled(pid, "ZX") for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes of the run outlived SIGKILL: {pids}")
        time.sleep(0.01)


# -- what the run's files show ----------------------------------------------------------------

@dataclass(frozen=True)
class WriteInProgress:
    staging: Path  # .iter_N.partial
    iteration: int
    files_written: int  # by this launch, so far


def staging_iteration(path: Path) -> Optional[int]:
    name = path.name
    if name.startswith(STAGING_PREFIX) and name.endswith(STAGING_SUFFIX):
        digits = name[len(STAGING_PREFIX):-len(STAGING_SUFFIX)]
        return int(digits) if digits.isdigit() else None
    return None


def _files_since(directory: Path, since_ns: int) -> int:
    count = 0
    for root, _dirs, names in os.walk(directory):
        for name in names:
            try:
                count += os.stat(os.path.join(root, name)).st_mtime_ns >= since_ns
            except FileNotFoundError:
                pass  # renamed or removed while we looked
    return count


def write_in_progress(checkpoints: Path, since_ns: int, from_iteration: int = 0) -> Optional[WriteInProgress]:
    """The checkpoint of an iteration >= from_iteration this launch (started at since_ns) is
    writing and has not made visible, if any: its staging directory holds files written since."""
    try:
        entries = list(os.scandir(checkpoints))
    except FileNotFoundError:
        return None
    for entry in entries:
        iteration = staging_iteration(Path(entry.path))
        if iteration is None or iteration < from_iteration:
            continue
        written = _files_since(Path(entry.path), since_ns)
        if written:
            return WriteInProgress(Path(entry.path), iteration, written)
    return None


def step_records(metrics_file: Path) -> list:
    """The training-step records of a metrics.jsonl, in file order; a last line torn by a kill
    (no newline yet) is not a record (the next start drops it: training/metrics.py)."""
    try:
        text = Path(metrics_file).read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # what follows the last newline is torn or empty
    return [r for r in map(json.loads, lines) if "lm_loss" in r]


def last_step(metrics_file: Path, since_ns: int = 0) -> int:
    """The step of the last complete line of metrics.jsonl logged at or after since_ns (0: none),
    read from its tail (lines an earlier launch left behind do not count)."""
    try:
        with open(metrics_file, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            tail = f.read()
    except FileNotFoundError:
        return 0
    for line in reversed(tail.split(b"\n")[:-1]):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the first line of the tail may be cut
        return record["step"] if record.get("time", 0) * 1e9 >= since_ns else 0
    return 0
