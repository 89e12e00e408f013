"""Heartbeats that name the rank or node that went silent when a collective fails.

A dead node or a stopped rank shows up on the other ranks as a collective that fails: at once
when the dead processes' sockets are closed (a killed process), after the collective timeout when
they are not (a stopped process, a node that lost power or its network). Either way each survivor
sees a gloo/NCCL error about some peer address, and the job's log fills with one such stack per
rank. So every rank beats: a thread writes a counter (with its host and iteration) into the job's
c10d store every `interval` seconds. When a collective fails, each survivor reads the counters
twice, `3 x interval` apart: a rank whose counter did not move is silent (a stopped process's
threads stop too; a dead one's keys stay as they were). The lowest rank still beating reports one
line naming the silent ranks and their hosts, "node_lost" when every rank of a host is silent,
"rank_silent" otherwise. A rank that has finished its own diagnosis marks itself "left", so a
slower survivor does not take it for silent.

The store is the one the job already has (torchrun's agent on the first node holds it): nothing
else to run. When the first node itself dies, the store goes with it, and so do rank 0 and the
SLURM batch script; then SLURM's own node-failure handling applies (see launch/slurm_template.py).
"""
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

PREFIX = "bloom/heartbeat/"
SURVEY_BEATS = 3  # how many beat intervals a survey waits for a counter to move


def beat_interval(collective_timeout_s: float) -> float:
    """Beat often enough that a survey (3 beats) takes well under the collective timeout it
    follows, but not so often that 384 ranks hammer one store: 1/10 of it, within 0.5-10 s."""
    return min(10.0, max(0.5, collective_timeout_s / 10))


@dataclass(frozen=True)
class Silent:
    rank: int
    host: str
    iteration: Optional[int]  # the last one it reported (None before training began)
    seconds: Optional[float]  # from its last beat to the failure, by its clock and ours; None: never beat


@dataclass(frozen=True)
class Silence:
    """What a survey found: the silent ranks, and whether this rank is the one to report it."""
    silent: List[Silent]
    hosts: Sequence[str]  # every rank's host, in rank order
    reporter: bool

    @property
    def lost_hosts(self) -> List[str]:
        """Hosts none of whose ranks beat: a node lost (or all of its ranks hung)."""
        quiet = {s.rank for s in self.silent}
        hosts = dict.fromkeys(self.hosts)
        return [h for h in hosts if all(r in quiet for r, rh in enumerate(self.hosts) if rh == h)]

    @property
    def reason(self) -> str:
        return "node_lost" if self.lost_hosts else "rank_silent"

    @property
    def silent_hosts(self) -> List[str]:
        return list(dict.fromkeys(s.host for s in self.silent))

    def message(self, error: BaseException, timeout_s: float) -> str:
        """One line: who went silent, where, since when, and what failed because of it."""
        whats = []
        for host in self.silent_hosts:
            ranks = [s for s in self.silent if s.host == host]
            names = ",".join(str(s.rank) for s in ranks)
            what = (f"node {host} (rank{'s' if len(ranks) > 1 else ''} {names})" if host in self.lost_hosts
                    else f"rank{'s' if len(ranks) > 1 else ''} {names} on {host}")
            last = ranks[0]
            if last.seconds is None:
                what += " never beat"
            else:
                what += (" silent" + ("" if last.iteration is None else f" since iteration {last.iteration}")
                         + f", its last beat {last.seconds:.0f} s before the failure")
            whats.append(what)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"{self.reason}: {'; '.join(whats)}; a collective failed "
                f"(timeout {timeout_s:g} s): {first_line[:200]}")

    def record(self) -> dict:
        """The part of exit.json that says who went silent (the job script excludes lost_hosts)."""
        return {"silent_ranks": [s.rank for s in self.silent], "silent_hosts": self.silent_hosts,
                "lost_hosts": self.lost_hosts}


class Heartbeat:
    """This rank's beat thread, and the survey the survivors run when a collective fails."""

    def __init__(self, store, rank: int, hosts: Sequence[str], interval_s: float):
        self.store, self.rank, self.hosts, self.interval = store, rank, list(hosts), interval_s
        self.progress: Callable[[], Optional[int]] = lambda: None
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bloom-heartbeat", daemon=True)

    @classmethod
    def start(cls, hosts: Sequence[str], collective_timeout_s: float) -> Optional["Heartbeat"]:
        """Beat for this rank of the job's world group; None for a job of one process."""
        if dist.get_world_size() == 1:
            return None
        # A connection of its own, so beats never queue behind the main thread's store calls.
        store = c10d._get_default_store().clone()
        beat = cls(store, dist.get_rank(), hosts, beat_interval(collective_timeout_s))
        beat._beat("alive")
        beat._thread.start()
        return beat

    def follow(self, progress: Callable[[], Optional[int]]) -> None:
        """Report progress() (the iteration) with every beat."""
        self.progress = progress

    def _beat(self, state: str) -> None:
        self._count += 1
        value = {"n": self._count, "state": state, "host": self.hosts[self.rank] if self.hosts else
                 socket.gethostname(), "iteration": self.progress(), "time": time.time()}
        self.store.set(f"{PREFIX}{self.rank}", json.dumps(value))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat("alive")
            except Exception:  # the store is gone (its node died): the survey will say so
                return

    def stop(self) -> None:
        """Leave: stop beating and say so, so that no survivor takes this rank for silent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval)
        try:
            self._beat("left")
        except Exception:
            pass

    # -- the survey -------------------------------------------------------------------------

    def _read(self) -> Dict[int, dict]:
        beats = {}
        for rank in range(len(self.hosts)):
            key = f"{PREFIX}{rank}"
            if self.store.check([key]):  # get() would block for a rank that never beat
                beats[rank] = json.loads(self.store.get(key))
        return beats

    def survey(self) -> Silence:
        """Who does not beat: read every counter, wait SURVEY_BEATS intervals, read again."""
        failed_at, before = time.time(), self._read()
        time.sleep(SURVEY_BEATS * self.interval)
        after = self._read()
        silent = []
        for rank, host in enumerate(self.hosts):
            if rank == self.rank:
                continue
            then, last = before.get(rank), after.get(rank)
            if last is None:
                silent.append(Silent(rank, host, None, None))
            elif last["state"] != "left" and then is not None and then["n"] == last["n"]:
                silent.append(Silent(rank, host, last["iteration"], max(0.0, failed_at - last["time"])))
        quiet = {s.rank for s in silent}
        reporter = min(r for r in range(len(self.hosts)) if r not in quiet) == self.rank
        return Silence(silent, self.hosts, reporter)

    def diagnose(self) -> Optional[Silence]:
        """After a failed collective: the silence behind it, or None when every rank still beats
        (the failure is something else, and its own error says more). Never raises: a store that
        cannot be read (the first node died) means there is nothing to report from here."""
        try:
            silence = self.survey()
        except Exception:
            return None
        return silence if silence.silent else None
