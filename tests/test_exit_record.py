"""The SLURM job script's requeue decision (training/exit_record.py): only a run that stopped for
more time (the time limit's SIGUSR1, the wall-clock budget) or because a node or rank went silent
(parallelism/watchdog.py), recorded by this job, and whose `latest` checkpoint is newer than the
one it started from, is requeued; everything else, and a missing or unreadable record, is not."""
import pytest

from training import exit_record


def saved(run_dir, iteration):
    """`latest` as training/checkpoint/files.py writes it."""
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "latest").write_text(f"iter_{iteration:08d}\n")


@pytest.fixture
def job(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    return "77"


@pytest.mark.parametrize("reason, start, stop, requeue", [
    ("SIGUSR1", 10, 25, True),
    ("time_budget", 0, 3, True),
    ("SIGUSR1", 10, 10, False),  # no progress: requeueing would loop forever
    ("finished", 0, 100, False),
    ("kill_switch", 0, 5, False),
    ("SIGTERM", 0, 5, False),  # scancel or preemption: not ours to undo
    ("error", 0, 5, False),
    ("node_lost", 0, 5, True),
    ("rank_silent", 3, 5, True),
])
def test_requeue_only_for_more_time_with_progress(tmp_path, job, reason, start, stop, requeue):
    exit_record.write(tmp_path, reason, start, stop)
    saved(tmp_path, stop)
    decision, why = exit_record.should_requeue(tmp_path, job)
    assert decision is requeue, why
    assert reason in why


def test_record_of_another_job_or_none_is_not_requeued(tmp_path, job):
    assert exit_record.should_requeue(tmp_path, job)[0] is False  # nothing written
    (tmp_path / exit_record.FILE_NAME).write_text("{torn")
    assert exit_record.should_requeue(tmp_path, job) == (False, f"no readable {tmp_path / 'exit.json'}: "
                                                               "the run did not stop cleanly")
    exit_record.write(tmp_path, "SIGUSR1", 0, 5)
    saved(tmp_path, 5)
    assert exit_record.should_requeue(tmp_path, "78")[0] is False


def test_progress_is_a_checkpoint_newer_than_the_start(tmp_path, job):
    """A node lost at iteration 58 of a start that resumed from 50: requeued only if `latest`
    moved past 50; a second loss before the next checkpoint is not requeued (no crash loop)."""
    exit_record.write(tmp_path, "node_lost", 50, 58, silent_hosts=["n2"], lost_hosts=["n2"])
    assert exit_record.should_requeue(tmp_path, job) == (
        False, "the run stopped for node_lost (n2) at iteration 58 with no checkpoint newer than "
               "iteration 50, where this start began: requeueing would not help")
    saved(tmp_path, 50)
    assert exit_record.should_requeue(tmp_path, job)[0] is False
    saved(tmp_path, 55)
    assert exit_record.should_requeue(tmp_path, job) == (
        True, "the run stopped for node_lost (n2) at iteration 58 and will resume from its checkpoint "
              "of iteration 55")
    (tmp_path / "checkpoints" / "latest").write_text("garbage\n")
    assert exit_record.should_requeue(tmp_path, job)[0] is False


def test_exclude_names_the_silent_hosts(tmp_path, job, capsys):
    exit_record.write(tmp_path, "rank_silent", 0, 9, silent_ranks=[3, 5], silent_hosts=["n2", "n3"],
                      lost_hosts=[])
    assert exit_record.main(["--exclude", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "n2,n3\n"
    exit_record.write(tmp_path, "SIGUSR1", 0, 9)
    assert exit_record.main(["--exclude", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "\n"


def test_command_line_exit_status(tmp_path, job, capsys):
    exit_record.write(tmp_path, "SIGUSR1", 0, 5)
    saved(tmp_path, 5)
    assert exit_record.main([str(tmp_path), job]) == 0
    assert capsys.readouterr().out.startswith("bloom-slurm: requeueing job 77: ")
    exit_record.write(tmp_path, "finished", 0, 5)
    assert exit_record.main([str(tmp_path), job]) == 1
    assert exit_record.main([]) == 2
