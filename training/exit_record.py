"""Why a run stopped: rank 0 writes `run_dir/exit.json` as its last act, so that the SLURM job
script can tell a run that must go on (the time limit's SIGUSR1, the wall-clock budget; a node
lost or a rank gone silent, see parallelism/watchdog.py) from one that is over (finished, a kill
switch, scancel's SIGTERM, an error), and requeue only the first.

    python -m training.exit_record RUN_DIR JOB_ID     exit 0: requeue this job; 1: don't
    python -m training.exit_record --exclude RUN_DIR  the hosts to leave out of the next start

A requeue is refused when the job made no progress: when `checkpoints/latest` is no newer than
the checkpoint this start resumed from. A job that cannot reach its next checkpoint (before the
time limit, or before a node fails again) would otherwise loop forever.
"""
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

FILE_NAME = "exit.json"
# Why a loop stops early, weakest first: when ranks disagree the strongest wins (a stop over a
# pause). Besides these a record says "finished" or "error".
EARLY_STOPS = ("time_budget", "SIGUSR1", "kill_switch", "SIGTERM")
# Stops that mean "not done, and not ours to end": out of time here, or a node (or one of its
# ranks) stopped answering. The job should continue in a new allocation, without those nodes.
REQUEUE_REASONS = ("SIGUSR1", "time_budget", "node_lost", "rank_silent")


def write(run_dir, reason: str, start_iteration: int, iteration: int, **details) -> Path:
    """Atomically record why the run stopped (with the SLURM job it ran in, if any); details
    such as silent_hosts (parallelism/watchdog.py) go in as they are."""
    path = Path(run_dir) / FILE_NAME
    record = {"reason": reason, "start_iteration": start_iteration, "iteration": iteration,
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"), **details}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)
    return path


def should_requeue(run_dir, job_id: str) -> Tuple[bool, str]:
    """(requeue?, why) for job `job_id`, from the record its run left."""
    path = Path(run_dir) / FILE_NAME
    record = _read(path)
    if record is None:
        return False, f"no readable {path}: the run did not stop cleanly"
    if str(record.get("slurm_job_id")) != str(job_id):
        return False, f"{path} was written by job {record.get('slurm_job_id')}, not {job_id}"
    reason = record.get("reason")
    if reason not in REQUEUE_REASONS:
        return False, f"the run stopped for {reason!r}, which does not ask for more time"
    start, saved = record.get("start_iteration", 0), checkpoint_iteration(run_dir)
    where = f" ({', '.join(record['silent_hosts'])})" if record.get("silent_hosts") else ""
    if saved is None or saved <= start:
        return False, (f"the run stopped for {reason}{where} at iteration {record.get('iteration')} "
                       f"with no checkpoint newer than iteration {start}, where this start began: "
                       "requeueing would not help")
    return True, (f"the run stopped for {reason}{where} at iteration {record['iteration']} and will "
                  f"resume from its checkpoint of iteration {saved}")


def checkpoint_iteration(run_dir) -> Optional[int]:
    """The iteration `checkpoints/latest` names (training/checkpoint/files.py), None if none."""
    try:
        name = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
        return int(name.split("_")[-1])
    except (OSError, ValueError):
        return None


def hosts_to_exclude(run_dir) -> List[str]:
    """The hosts whose ranks went silent (a lost node, or a hung rank on it): a requeued job
    should not land on them again."""
    record = _read(Path(run_dir) / FILE_NAME) or {}
    return [str(host) for host in record.get("silent_hosts") or []]


def _read(path: Path) -> Optional[dict]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--exclude":
        print(",".join(hosts_to_exclude(argv[1])))
        return 0
    if len(argv) != 2:
        print("usage: python -m training.exit_record RUN_DIR JOB_ID | --exclude RUN_DIR", file=sys.stderr)
        return 2
    requeue, why = should_requeue(*argv)
    print(f"bloom-slurm: {'requeueing' if requeue else 'not requeueing'} job {argv[1]}: {why}",
          flush=True)
    return 0 if requeue else 1


if __name__ == "__main__":
    sys.exit(main())
