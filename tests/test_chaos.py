"""Chaos: a TP2 x DP2 bloom-train run (4 processes under the local launcher, dropout 0.1, bf16 where
the machine has it, a checkpoint every 1-2 iterations, async and sync saves) SIGKILLed whole (the
launcher, torchrun and every rank) at 10 moments drawn from a seed, and restarted each time from
`latest`, ends with the metrics of an uninterrupted run of the same layout, bitwise, step for step.

Half the moments strike while a checkpoint is being written (its hidden staging directory holds
files of this launch; the run is frozen and the write seen still in progress before the SIGKILL),
at a drawn depth into the write; the first of them aims at the run's first checkpoint as soon as
it holds a file, so that the next start finds none and begins again. The others strike a drawn
time after a drawn step. After every kill: `latest` names a complete checkpoint, no older than
before the kill, and every complete checkpoint passes the project's verifier (each file's size
and xxh3 against its manifest) with every rank's files; a write that was struck stays hidden and
did not become `latest`; metrics.jsonl holds the reference's records and nothing else. The next
start says it resumed from that `latest`.

The seed is printed; BLOOM_CHAOS_SEED=<seed> replays the same moments (the run's timing decides
only where inside a write or a step each one lands).
"""
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from tests import chaos
from tests.bloom_train import TINY_RUN, data_cache  # noqa: F401
from training.checkpoint import files

REPO = Path(__file__).resolve().parent.parent
SEED_ENV = "BLOOM_CHAOS_SEED"
KILLS, WRITE_KILLS, ASYNC_WRITE_KILLS = 10, 5, 3
# Each launch is struck 1-3 iterations past where it resumed (the moments aim no later than
# ITERS - 6): the run has not ended when the last kill comes (10 kills moved it 6-10 iterations).
ITERS = 30
SEGMENT_TIMEOUT_S = 240
RANKS = 4
# Wall-clock measurements: they differ between any two runs and are not compared.
TIMINGS = {"time", "iteration_time", "samples_per_sec", "tokens_per_sec", "tflops_per_device"}


def precision() -> str:
    from parallelism.precision_support import unsupported_reason

    return "bf16" if unsupported_reason("bf16") is None else "fp32"


def overrides(run_dir, cache, *, async_save=False, save_interval=1000) -> list:
    # model.kernels=eager: the compiled GeLU would spend ~3 s compiling at every restart.
    return TINY_RUN + [
        "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "model.kernels=eager",
        "parallel.tp=2", f"launcher.nproc_per_node={RANKS}", "trainer.global_batch_size=8",
        f"trainer.precision={precision()}", f"trainer.train_iters={ITERS}",
        f"trainer.save_interval={save_interval}", f"trainer.async_save={async_save}",
        f"trainer.run_dir={run_dir}", f"data.cache_dir={cache}"]


def launch(args, log: Path):
    """bloom-train in its own session, its output to `log`; (process, launch time in ns)."""
    since = time.time_ns()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launch.train_cli", *args], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, since


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text().splitlines()[-lines:])


def deterministic(records) -> list:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):  # noqa: F811
    """The uninterrupted run: its step records, and how many files its (final) checkpoint has."""
    run = tmp_path_factory.mktemp("chaos-reference")
    start = time.monotonic()
    proc, _ = launch(overrides(run / "run", data_cache), run / "log")
    assert proc.wait(timeout=SEGMENT_TIMEOUT_S) == 0, tail(run / "log")
    print(f"reference run: {time.monotonic() - start:.1f} s", flush=True)
    records = chaos.step_records(run / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, ITERS + 1))
    final = files.iteration_dir(run / "run" / "checkpoints", ITERS)
    return deterministic(records), len(files.verify(final)["files"]) + 1  # + the manifest


# -- the moments ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Moment:
    kind: str  # "write": inside a checkpoint write; "step": a while after a step was logged
    after: int  # iterations past the resumed one: the step (step), the first save at or after (write)
    delay_s: float  # step: how long after that step's metrics line to strike
    depth: float  # write: the fraction of the checkpoint's files written when it strikes
    async_save: bool
    save_interval: int


def draw_moments(seed: int) -> list:
    rng = random.Random(seed)
    kinds = ["write"] * (WRITE_KILLS - 1) + ["step"] * (KILLS - WRITE_KILLS)
    rng.shuffle(kinds)
    # The first strikes the first checkpoint's write as soon as it holds a file (depth 0: too
    # quick a write is not passed over): the next start finds no checkpoint and begins again.
    kinds.insert(0, "write")
    # The async path is where a write overlaps training; at least ASYNC_WRITE_KILLS strike it.
    write_modes = [True] * ASYNC_WRITE_KILLS + [False] * (WRITE_KILLS - ASYNC_WRITE_KILLS)
    rng.shuffle(write_modes)
    moments = []
    for i, kind in enumerate(kinds):
        async_save = write_modes.pop() if kind == "write" else rng.random() < 0.5
        first = i == 0
        moments.append(Moment(kind, 1 if first else rng.randint(1, 3), rng.uniform(0.0, 0.15),
                              0.0 if first else rng.random(), async_save, rng.choice([1, 2])))
    return moments


def test_every_schedule_strikes_the_planned_writes():
    """Whatever the seed: KILLS moments, WRITE_KILLS of them inside a write (ASYNC_WRITE_KILLS of
    those async), the first a write at depth 0 one save past the start (the run's first
    checkpoint, so that the next start finds none); every moment aims 1-3 iterations past the
    resumed one."""
    for seed in range(200):
        moments = draw_moments(seed)
        writes = [m for m in moments if m.kind == "write"]
        assert len(moments) == KILLS and {m.kind for m in moments} == {"write", "step"}, (seed, moments)
        assert (len(writes), sum(m.async_save for m in writes)) == (WRITE_KILLS, ASYNC_WRITE_KILLS), (seed, moments)
        first = moments[0]
        assert (first.kind, first.after, first.depth) == ("write", 1, 0.0), (seed, first)
        assert all(1 <= m.after <= 3 and 0 <= m.depth < 1 and m.save_interval in (1, 2) for m in moments), seed
    assert draw_moments(7) == draw_moments(7)  # BLOOM_CHAOS_SEED replays the same moments


# -- one launch, killed -----------------------------------------------------------------------

@dataclass
class Kill:
    found: Optional[chaos.WriteInProgress]  # the write in progress when it struck, if any
    step: int  # the last step logged
    seconds: float  # from launch to kill


def strike(proc, pids: list, found, run: Path, since: int) -> Kill:
    """SIGKILL the frozen run, all of it."""
    chaos.kill(proc, pids)
    return Kill(found, chaos.last_step(run / "metrics.jsonl"), (time.time_ns() - since) / 1e9)


def crash_at(moment: Moment, run: Path, args: list, log: Path, resumed_at: int, n_files: int) -> Kill:
    """Launch, wait for the moment, strike. A write-moment freezes the run when the write holds
    `depth` of its files, checks under the freeze that it is still in progress, and strikes; if
    the write became visible meanwhile (or was too quick to reach that depth), the run goes on to
    the next write, struck at half the depth."""
    proc, since = launch(args, log)
    target = min(resumed_at + moment.after, ITERS - 6)
    wanted = max(1, math.ceil(moment.depth * n_files))
    watched = None
    deadline = time.monotonic() + SEGMENT_TIMEOUT_S
    try:
        while True:
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no moment to strike within {SEGMENT_TIMEOUT_S} s:\n{tail(log)}"
            if moment.kind == "step":
                if chaos.last_step(run / "metrics.jsonl", since) >= target:
                    time.sleep(moment.delay_s)
                    pids = chaos.freeze(proc.pid)
                    return strike(proc, pids, chaos.write_in_progress(run / "checkpoints", since), run, since)
            else:
                found = chaos.write_in_progress(run / "checkpoints", since, target)
                if found is not None and found.iteration != watched:
                    if watched is not None:  # the last one finished before reaching the depth
                        wanted = max(1, wanted // 2)
                    watched = found.iteration
                if found is not None and found.files_written >= wanted:
                    pids = chaos.freeze(proc.pid)
                    frozen = chaos.write_in_progress(run / "checkpoints", since, target)
                    if frozen is not None and frozen.iteration == found.iteration:
                        return strike(proc, pids, frozen, run, since)
                    chaos.thaw(pids)  # made visible between the look and the freeze
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            chaos.kill(proc, chaos.freeze(proc.pid))


# -- what must hold after each kill -----------------------------------------------------------

def check_latest(checkpoints: Path, before: int, why: str) -> int:
    """`latest` names a complete checkpoint whose every file matches its manifest, with every rank's
    files, no older than `before`; returns its iteration (0: none yet, allowed only before any)."""
    latest = files.resolve_latest(checkpoints)
    if latest is None:
        assert before == 0, f"{why}: `latest` is gone (it named iteration {before})"
        return 0
    assert latest in files.complete_checkpoints(checkpoints), f"{why}: `latest` names {latest.name}, not complete"
    check_complete(latest, why)
    iteration = int(latest.name.split("_")[1])
    assert iteration >= before, f"{why}: `latest` went back from iteration {before} to {iteration}"
    return iteration


def check_complete(directory: Path, why: str) -> None:
    try:
        manifest = files.verify(directory)  # every file: present, size and xxh3 as in the manifest
    except files.CheckpointError as error:
        raise AssertionError(f"{why}: {error}") from None
    for rank in range(RANKS):
        for kind in ("model", "optim"):
            assert f"{kind}/rank{rank:05d}.safetensors" in manifest["files"], f"{why}: {directory.name} lacks rank {rank}'s {kind}"
        assert f"rng/rank{rank:05d}.pt" in manifest["files"], f"{why}: {directory.name} lacks rank {rank}'s RNG"


def check_every_checkpoint(checkpoints: Path, why: str) -> None:
    """No complete checkpoint left corrupt: each passes the verifier, with every rank's files."""
    for directory in files.complete_checkpoints(checkpoints):
        check_complete(directory, why)


def check_struck_write(kill: Kill, checkpoints: Path, latest: int, why: str) -> None:
    """The write struck stays a hidden staging directory; `latest` is the checkpoint before it."""
    assert kill.found is not None, f"{why}: no checkpoint write was in progress when it struck"
    assert kill.found.staging.is_dir(), f"{why}: {kill.found.staging.name} vanished"
    assert files.iteration_dir(checkpoints, kill.found.iteration) not in files.complete_checkpoints(checkpoints), \
        f"{why}: the checkpoint being written, iteration {kill.found.iteration}, became visible"
    assert latest < kill.found.iteration, f"{why}: `latest` is {latest}, at or past the struck write"


def check_metrics(run: Path, reference: list, why: str) -> None:
    got = deterministic(chaos.step_records(run / "metrics.jsonl"))
    steps = [r["step"] for r in got]
    assert steps == list(range(1, len(got) + 1)), f"{why}: metrics.jsonl steps {steps}"
    for record, expected in zip(got, reference):
        assert record == expected, f"{why}: step {record['step']} differs from the uninterrupted run:\n{record}\n{expected}"


def check_resumed_from(run: Path, logs_before: set, latest: int, why: str) -> None:
    """Rank 0 of the launch said it resumed from `latest` (or started fresh when there was none)."""
    new = [d for d in (run / "logs" / "ranks").iterdir() if d not in logs_before]
    assert len(new) == 1, f"{why}: expected one new torchrun log directory, found {new}"
    said = (new[0] / "attempt_0" / "0" / "stdout.log").read_text()
    if latest:
        expected = f"resumed from {files.iteration_dir(run / 'checkpoints', latest)} at iteration {latest},"
        assert expected in said, f"{why}: rank 0 did not say '{expected}':\n{said[-2000:]}"
    else:
        assert "resumed from" not in said, f"{why}: resumed with no checkpoint there:\n{said[-2000:]}"


def _logs(run: Path) -> set:
    ranks = run / "logs" / "ranks"
    return set(ranks.iterdir()) if ranks.is_dir() else set()


# -- the test ---------------------------------------------------------------------------------

def test_ten_sigkills_with_restarts_end_bitwise_equal_with_no_checkpoint_lost(tmp_path, data_cache, reference):  # noqa: F811
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"chaos seed {seed} (replay: {SEED_ENV}={seed}); precision {precision()}", flush=True)
    expected, n_files = reference
    run = tmp_path / "run"
    latest, struck = 0, []  # (async?) of each write a kill struck while it was in progress
    for i, moment in enumerate(draw_moments(seed), 1):
        why = f"seed {seed}, kill {i} ({moment})"
        args = overrides(run, data_cache, async_save=moment.async_save, save_interval=moment.save_interval)
        logs = _logs(run)
        kill = crash_at(moment, run, args, tmp_path / f"launch-{i:02d}.log", latest, n_files)
        print(f"kill {i:2d} after {kill.seconds:5.1f} s: {moment.kind:5s} {'async' if moment.async_save else 'sync '} "
              f"every {moment.save_interval}, resumed at {latest:2d}, step {kill.step:2d} logged, write in progress: "
              + (f"iteration {kill.found.iteration} ({kill.found.files_written}/{n_files} files)" if kill.found else "none"),
              flush=True)
        check_resumed_from(run, logs, latest, why)
        latest_after = check_latest(run / "checkpoints", latest, why)
        check_every_checkpoint(run / "checkpoints", why)
        if moment.kind == "write":
            check_struck_write(kill, run / "checkpoints", latest_after, why)
            struck.append(moment.async_save)
        check_metrics(run, expected, why)
        latest = latest_after
    # every write the schedule planned was struck in progress, the async ones among them
    assert (len(struck), sum(struck)) == (WRITE_KILLS, ASYNC_WRITE_KILLS), f"seed {seed}: struck {struck}"

    logs, start = _logs(run), time.monotonic()
    final, _ = launch(overrides(run, data_cache, async_save=True, save_interval=2), tmp_path / "final.log")
    assert final.wait(timeout=SEGMENT_TIMEOUT_S) == 0, tail(tmp_path / "final.log")
    print(f"last launch (resumed at {latest}, ran to {ITERS}): {time.monotonic() - start:.1f} s", flush=True)
    why = f"seed {seed}, after the last launch"
    check_resumed_from(run, logs, latest, why)
    got = deterministic(chaos.step_records(run / "metrics.jsonl"))
    assert len(got) == ITERS and got == expected, f"{why}: metrics differ from the uninterrupted run"
    assert check_latest(run / "checkpoints", latest, why) == ITERS
    check_every_checkpoint(run / "checkpoints", why)
