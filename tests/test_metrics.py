"""Metrics logging (metrics.jsonl, TensorBoard, wandb offline).

The trackers are the real libraries: TensorBoard event files are read back with TensorBoard's own
EventAccumulator; wandb runs offline into run_dir/wandb, and its .wandb transaction logs are read
back record by record (wandb's own protobuf Record; the framing is the LevelDB log format wandb
writes, checksums verified) and compared with metrics.jsonl. Nothing here goes online.
"""
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config.schema import LoggingConfig
from training.metrics import MetricsLogger, format_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch):
    # Never online, whatever the machine's environment holds.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def our_warnings(caplog):
    # Only this module's: wandb's own threads may log warnings from an earlier test's run.
    return [r for r in caplog.records
            if r.name == "training.metrics" and r.levelno == logging.WARNING]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def step_metrics(step):
    return {"lm_loss": 10.0 / step, "lr": 1e-4 * step, "grad_norm": 0.5,
            "tokens_per_sec": 1000.0 + step, "consumed_samples": 8 * step}


# ---- metrics.jsonl -----------------------------------------------------------------------------

def test_jsonl_holds_what_was_logged(tmp_path):
    cfg = LoggingConfig(tensorboard=False, wandb=False)
    with MetricsLogger(tmp_path, cfg, is_writer=True, config_dict={}) as logger:
        for step in (1, 2, 3):
            logger.log(step, step_metrics(step))
        extra = {"lm_loss": torch.tensor(2.5), "loss_scale": np.float32(4096.0), "skipped": True,
                 "valid/en_loss": 3.25, "phase": "eval", "missing": None, "nan_loss": float("nan")}
        logger.log(4, extra)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records[:3]:
        expected = step_metrics(record["step"])
        assert {k: record[k] for k in expected} == expected
    last = records[3]
    assert last["lm_loss"] == 2.5 and last["loss_scale"] == 4096.0 and last["skipped"] is True
    assert last["valid/en_loss"] == 3.25 and last["phase"] == "eval" and last["missing"] is None
    assert last["nan_loss"] != last["nan_loss"]  # NaN survives (Python's json writes NaN)
    times = [r["time"] for r in records]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 60


def test_resumed_logger_appends(tmp_path):
    cfg = LoggingConfig(tensorboard=False, wandb=False)
    with MetricsLogger(tmp_path, cfg, True, {}) as logger:
        logger.log(1, step_metrics(1))
    with MetricsLogger(tmp_path, cfg, True, {}) as logger:
        logger.log(2, step_metrics(2))
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_non_writer_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(tensorboard=True, wandb=True)
    logger = MetricsLogger(run_dir, cfg, is_writer=False, config_dict={"a": 1})
    logger.log(1, step_metrics(1))
    assert logger.truncate_after(0) == 0
    assert "lm_loss" in logger.format_line(1, step_metrics(1))
    logger.close()
    assert not run_dir.exists()


KILLED_WRITER = """
import sys
from training.config.schema import LoggingConfig
from training.metrics import MetricsLogger
logger = MetricsLogger(sys.argv[1], LoggingConfig(tensorboard=False, wandb=False), True, {})
step = 0
while True:
    logger.log(step, {"lm_loss": 1.0, "padding": "x" * 3000})
    step += 1
"""


def test_sigkill_loses_at_most_the_line_in_flight(tmp_path):
    path = tmp_path / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=REPO)
    try:
        deadline = time.time() + 20
        while (not path.exists() or path.stat().st_size < 200_000) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = path.read_text().split("\n")
    complete = [json.loads(line) for line in lines[:-1]]  # all but a possibly partial tail
    assert len(complete) > 50
    assert [r["step"] for r in complete] == list(range(len(complete)))
    # Resuming cuts any partial tail, so the next record starts on a line of its own.
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, wandb=False), True, {}) as lg:
        lg.log(len(complete), {"lm_loss": 0.5})
    assert [r["step"] for r in read_jsonl(path)] == list(range(len(complete) + 1))


def test_torn_last_line_is_dropped_on_open(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lm_loss": 2.0}\n{"step": 2, "lm_lo')
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, wandb=False), True, {}) as lg:
        lg.log(2, {"lm_loss": 1.5})
    assert read_jsonl(path) == [{"step": 1, "lm_loss": 2.0}, read_jsonl(path)[1]]
    assert read_jsonl(path)[1]["lm_loss"] == 1.5


# ---- truncate_after ----------------------------------------------------------------------------

def test_truncate_after_drops_later_steps_and_keeps_appending(tmp_path):
    cfg = LoggingConfig(tensorboard=False, wandb=False)
    with MetricsLogger(tmp_path, cfg, True, {}) as logger:
        for step in range(1, 6):
            logger.log(step, step_metrics(step))
        assert logger.truncate_after(3) == 2
        logger.log(4, {"lm_loss": 0.25})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["lm_loss"] == 0.25
    assert not list(tmp_path.glob("*.tmp"))


def test_truncate_after_replaces_the_file_by_rename(tmp_path):
    """Atomic: the kept lines go to a new file renamed over the old one, so a reader (or a crash)
    sees the old file whole or the new one whole, never a half-rewritten file."""
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, wandb=False), True, {}) as lg:
        for step in range(1, 6):
            lg.log(step, step_metrics(step))
        old_inode = path.stat().st_ino
        with open(path) as reader_before:  # a reader holding the old file
            lg.truncate_after(2)
            assert [json.loads(x)["step"] for x in reader_before] == [1, 2, 3, 4, 5]
        assert path.stat().st_ino != old_inode
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_truncate_after_crash_before_rename_leaves_the_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, wandb=False), True, {}) as lg:
        for step in range(1, 6):
            lg.log(step, step_metrics(step))

        def crash(*args):
            raise OSError("simulated crash before the rename")

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(OSError):
            lg.truncate_after(2)
        monkeypatch.undo()
        assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]
        lg.log(6, step_metrics(6))  # the logger still appends after the failure
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5, 6]


# ---- TensorBoard -------------------------------------------------------------------------------

def tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    cfg = LoggingConfig(tensorboard=True, wandb=False)
    with MetricsLogger(tmp_path, cfg, True, {}) as logger:
        for step in (10, 20, 30):
            logger.log(step, {**step_metrics(step), "valid/fr_loss": 4.0 + step,
                              "phase": "train", "skipped": False})
    scalars = tensorboard_scalars(tmp_path)
    assert set(scalars) == {"lm_loss", "lr", "grad_norm", "tokens_per_sec", "consumed_samples",
                            "valid/fr_loss", "skipped"}  # not "phase", "step" or "time"
    assert [s for s, _ in scalars["lm_loss"]] == [10, 20, 30]
    assert [v for _, v in scalars["lm_loss"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [v for _, v in scalars["valid/fr_loss"]] == pytest.approx([14.0, 24.0, 34.0])


def test_tensorboard_after_truncate_shows_the_rerun_steps(tmp_path):
    cfg = LoggingConfig(tensorboard=True, wandb=False)
    with MetricsLogger(tmp_path, cfg, True, {}) as logger:
        for step in (1, 2, 3, 4):
            logger.log(step, {"lm_loss": float(step)})
    with MetricsLogger(tmp_path, cfg, True, {}) as logger:  # resumed from the step-2 checkpoint
        logger.truncate_after(2)
        logger.log(3, {"lm_loss": 30.0})
    assert tensorboard_scalars(tmp_path)["lm_loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_tensorboard_failure_warns_once_and_training_goes_on(tmp_path, caplog):
    (tmp_path / "tensorboard").write_text("a file where the event directory should be")
    with caplog.at_level(logging.WARNING, logger="training.metrics"):
        with MetricsLogger(tmp_path, LoggingConfig(tensorboard=True, wandb=False), True, {}) as lg:
            lg.log(1, step_metrics(1))
    warnings = our_warnings(caplog)
    assert len(warnings) == 1 and "TensorBoard" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["lm_loss"] == 10.0


# ---- wandb (offline) ---------------------------------------------------------------------------

def wandb_run_dirs(run_dir):
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def wandb_log_bytes(run, until, timeout=15.0):
    """The offline run's .wandb transaction log, once it holds `until`: wandb-core (a separate
    process) may still be writing it when run.finish() returns, on a loaded machine."""
    deadline = time.time() + timeout
    while True:
        data = b"".join(p.read_bytes() for p in run.glob("*.wandb"))
        if until in data or time.time() > deadline:
            return data
        time.sleep(0.1)


# The .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log records in
# 32 KiB blocks: crc32 (over the type byte and the data), length, type (1 full, 2 first, 3 middle,
# 4 last piece of a record that spans blocks), data: one serialized wandb Record each.
WANDB_BLOCK, WANDB_RECORD_HEADER = 32768, 7


def wandb_records(path: Path) -> list:
    """Every Record of one .wandb file, in order (wandb 0.31 ships no Python reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path}: not a .wandb log"
    records, pending, pos = [], b"", 7
    while pos + WANDB_RECORD_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_RECORD_HEADER:  # a block's zero-padded tail
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + WANDB_RECORD_HEADER])
        if (crc, length, kind) == (0, 0, 0):
            break
        chunk = data[pos + WANDB_RECORD_HEADER: pos + WANDB_RECORD_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pos += WANDB_RECORD_HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def wandb_history(run_dir, sessions: int, timeout=15.0) -> list:
    """The rows the offline run logged, oldest session first, as {key: value} without wandb's
    own "_step", "_runtime", "_timestamp"; waits (wandb-core writes on after finish() returns)
    until each of the `sessions` folders' logs ends with its exit record."""
    deadline = time.time() + timeout
    while True:
        logs = [p for run in wandb_run_dirs(run_dir) for p in sorted(run.glob("*.wandb"))]
        records = [wandb_records(p) for p in logs]
        done = [any(r.WhichOneof("record_type") == "exit" for r in log) for log in records]
        if (len(done) == sessions and all(done)) or time.time() > deadline:
            break
        time.sleep(0.1)
    assert len(done) == sessions and all(done), f"{len(done)} wandb logs, finished: {done}"
    rows = []
    for record in (r for log in records for r in log):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                   for item in record.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def assert_wandb_matches_jsonl(run_dir, sessions: int) -> None:
    """wandb holds one row per metrics.jsonl record, same step, same numeric values (its scalars:
    bools as 0/1; strings, None and the time stamp only in the jsonl)."""
    rows = wandb_history(run_dir, sessions)
    records = read_jsonl(Path(run_dir) / "metrics.jsonl")
    assert [row["step"] for row in rows] == [r["step"] for r in records]
    for row, record in zip(rows, records):
        expected = {k: float(v) for k, v in record.items()
                    if k not in ("step", "time") and isinstance(v, (int, float))}
        assert {k: v for k, v in row.items() if k != "step"} == expected, f"step {record['step']}"


def test_wandb_offline_run_and_resume_with_the_same_id(tmp_path):
    cfg = LoggingConfig(tensorboard=False, wandb=True, wandb_project="bloom-test")
    first = MetricsLogger(tmp_path, cfg, True, {"model": {"hidden_size": 64}})
    first_id = first._wandb.id
    first.log(1, {**step_metrics(1), "valid/de_loss": 5.0, "dataset_tag": "zq-not-a-scalar",
                  "loss_scale": np.float32(4096.0), "skipped": True, "grad_norm": torch.tensor(0.75)})
    first.close()
    runs = wandb_run_dirs(tmp_path)
    assert len(runs) == 1 and runs[0].name.endswith(first_id)
    data = wandb_log_bytes(runs[0], until=b"valid/de_loss")
    assert b"lm_loss" in data and b"valid/de_loss" in data
    assert b"dataset_tag" not in data and b"zq-not-a-scalar" not in data
    assert_wandb_matches_jsonl(tmp_path, sessions=1)
    assert wandb_history(tmp_path, 1)[0]["grad_norm"] == 0.75  # the tensor, as a number

    second = MetricsLogger(tmp_path, cfg, True, {"model": {"hidden_size": 64}})
    assert second._wandb.id == first_id
    second.log(2, step_metrics(2))
    second.log(3, {**step_metrics(3), "valid/de_loss": 4.5})
    second.close()
    # wandb names each session's folder offline-run-<time>-<id>[-n]: both carry the one id.
    resumed = wandb_run_dirs(tmp_path)
    assert len(resumed) == 2 and all(f"-{first_id}" in p.name for p in resumed)
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == first_id
    # Read back, both sessions together hold what metrics.jsonl holds, step for step.
    assert_wandb_matches_jsonl(tmp_path, sessions=2)


def test_wandb_failure_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "not-a-mode")  # wandb.init rejects it: a real init failure
    with caplog.at_level(logging.WARNING, logger="training.metrics"):
        with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, wandb=True), True, {}) as lg:
            lg.log(1, step_metrics(1))
            lg.log(2, step_metrics(2))
    warnings = our_warnings(caplog)
    assert len(warnings) == 1 and "wandb" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


# ---- the console line --------------------------------------------------------------------------

def test_format_line_reads_like_megatron():
    metrics = {"valid/en_loss": 2.5, "lm_loss": 3.41, "lr": 2.9e-4, "grad_norm": 0.81,
               "tokens_per_sec": 12345.0, "consumed_samples": 1920, "tflops_per_device": 0.0123,
               "note": None}
    assert format_line(120, metrics, 1000) == (
        "iter 120/1000 | consumed 1920 | lm_loss 3.4100 | lr 2.9e-04 | grad_norm 0.810 | "
        "tokens/s 12.3k | TFLOPs 0.01 | valid/en_loss 2.5")
    assert format_line(7, {"lm_loss": float("nan"), "tokens_per_sec": 2.5e6}) == (
        "iter 7 | lm_loss nan | tokens/s 2.5M")


def wandb_history_by_run(run_dir, runs: int, timeout=15.0) -> dict:
    """{run id: its history rows in order (all its sessions)}, the id read from each offline
    session's own run record; waits until `runs` distinct ids have finished logs."""
    deadline = time.time() + timeout
    while True:
        logs = [[r for f in sorted(p.glob("*.wandb")) for r in wandb_records(f)] for p in wandb_run_dirs(run_dir)]
        done = all(any(r.WhichOneof("record_type") == "exit" for r in log) for log in logs)
        ids = [next((r.run.run_id for r in log if r.WhichOneof("record_type") == "run"), None) for log in logs]
        if (len(set(ids)) == runs and done) or time.time() > deadline:
            break
        time.sleep(0.1)
    assert len(set(ids)) == runs and done, f"wandb runs {ids}, all finished: {done}"
    history = {}
    for run_id, log in zip(ids, logs):
        rows = history.setdefault(run_id, [])
        for record in (r for r in log if r.WhichOneof("record_type") == "history"):
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return history


def test_wandb_after_a_rewind_holds_each_step_once(tmp_path):
    """A run logged to step 5 resumes from a checkpoint at step 3 and logs 4 and 5 again with
    other values: the wandb run it writes to (named in run_dir/wandb/run_id, same group) holds
    steps 1-5 once each with metrics.jsonl's values; the first run, finished, says where its
    history continues."""
    cfg = LoggingConfig(tensorboard=False, wandb=True, wandb_project="bloom-test")
    first = MetricsLogger(tmp_path, cfg, True, {})
    first_id = first._wandb.id
    for step in range(1, 6):
        first.log(step, step_metrics(step))
    first.close()

    resumed = MetricsLogger(tmp_path, cfg, True, {})
    assert resumed.truncate_after(3) == 2
    new_id = resumed._wandb.id
    assert new_id != first_id and resumed._wandb.group == first_id
    for step in (4, 5):
        resumed.log(step, {**step_metrics(step), "lm_loss": 99.0 + step})
    resumed.close()
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == new_id

    history = wandb_history_by_run(tmp_path, runs=2)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    rows = history[new_id]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] == [r["step"] for r in records]
    for row, record in zip(rows, records):
        assert row["lm_loss"] == record["lm_loss"], record["step"]
    assert [r["lm_loss"] for r in rows[3:]] == [103.0, 104.0]
    assert [r["step"] for r in history[first_id]] == [1, 2, 3, 4, 5]  # the abandoned timeline, as logged
