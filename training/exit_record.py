"""Why a run stopped: rank 0 writes `run_dir/exit.json` as its last act, so that the SLURM job
script can tell a run that must go on (the time limit's SIGUSR1, the wall-clock budget) from one
that is over (finished, a kill switch, scancel's SIGTERM, an error), and requeue only the first.

    python -m training.exit_record RUN_DIR JOB_ID     exit 0: requeue this job; 1: don't

A requeue is refused when the job made no progress (it stopped at the iteration it started
from): a job that cannot reach its first step before the time limit would otherwise loop forever.
"""
import json
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

FILE_NAME = "exit.json"
# Why a loop stops early, weakest first: when ranks disagree the strongest wins (a stop over a
# pause). Besides these a record says "finished" or "error".
EARLY_STOPS = ("time_budget", "SIGUSR1", "kill_switch", "SIGTERM")
# Stops that mean "out of time here, not done": the job should continue in a new allocation.
REQUEUE_REASONS = ("SIGUSR1", "time_budget")


def write(run_dir, reason: str, start_iteration: int, iteration: int) -> Path:
    """Atomically record why the run stopped (with the SLURM job it ran in, if any)."""
    path = Path(run_dir) / FILE_NAME
    record = {"reason": reason, "start_iteration": start_iteration, "iteration": iteration,
              "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
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
    if record.get("iteration", 0) <= record.get("start_iteration", 0):
        return False, (f"the run stopped for {reason} without progress (iteration "
                       f"{record.get('iteration')}): requeueing would not help")
    return True, f"the run stopped for {reason} at iteration {record['iteration']} and will resume"


def _read(path: Path) -> Optional[dict]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m training.exit_record RUN_DIR JOB_ID", file=sys.stderr)
        return 2
    requeue, why = should_requeue(*argv)
    print(f"bloom-slurm: {'requeueing' if requeue else 'not requeueing'} job {argv[1]}: {why}",
          flush=True)
    return 0 if requeue else 1


if __name__ == "__main__":
    sys.exit(main())
