"""The SLURM job script's requeue decision (training/exit_record.py): only a run that stopped for
more time (the time limit's SIGUSR1, the wall-clock budget) after making progress, recorded by
this job, is requeued; everything else, and a missing or unreadable record, is not."""
import pytest

from training import exit_record


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
])
def test_requeue_only_for_more_time_with_progress(tmp_path, job, reason, start, stop, requeue):
    exit_record.write(tmp_path, reason, start, stop)
    decision, why = exit_record.should_requeue(tmp_path, job)
    assert decision is requeue, why
    assert reason in why


def test_record_of_another_job_or_none_is_not_requeued(tmp_path, job):
    assert exit_record.should_requeue(tmp_path, job)[0] is False  # nothing written
    (tmp_path / exit_record.FILE_NAME).write_text("{torn")
    assert exit_record.should_requeue(tmp_path, job) == (False, f"no readable {tmp_path / 'exit.json'}: "
                                                               "the run did not stop cleanly")
    exit_record.write(tmp_path, "SIGUSR1", 0, 5)
    assert exit_record.should_requeue(tmp_path, "78")[0] is False


def test_command_line_exit_status(tmp_path, job, capsys):
    exit_record.write(tmp_path, "SIGUSR1", 0, 5)
    assert exit_record.main([str(tmp_path), job]) == 0
    assert capsys.readouterr().out.startswith("bloom-slurm: requeueing job 77: ")
    exit_record.write(tmp_path, "finished", 0, 5)
    assert exit_record.main([str(tmp_path), job]) == 1
    assert exit_record.main([]) == 2
