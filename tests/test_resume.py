"""Exact resume, with BigScience's dropout (hidden and attention 0.1) on, so every rank's saved
random streams must come back: a run killed with SIGKILL and resumed (twice, across a batch-size
rampup boundary) reports bitwise the losses and consumed samples of an uninterrupted run at every
step; so does a run resumed at TP2 x DP2 and at PP2 x DP2 (and one process), in fp32 and in bf16.
A kill during a save leaves the previous checkpoint in use; a corrupt checkpoint is detected by
its checksum and the previous one used; a checkpoint of another model shape is refused in one line."""
from pathlib import Path

import pytest

from parallelism.topology import Layout
from tests.bloom_train import TINY_RUN, bloom_train, data_cache, run_trainer, step_losses  # noqa: F401
from tests.multiprocess import run_processes

DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
# Global batch 4 -> 8 in two increments of 2, one every 8 samples: 4, 4, 6, 6, 8, ... (a rampup).
RAMPUP = TINY_RUN + DROPOUT + ["trainer.global_batch_size=8", "trainer.rampup_batch_size=[4,2,16]"]
ITERS = 9


def args(run_dir, cache, extra=()):
    return RAMPUP + [f"trainer.run_dir={run_dir}", f"data.cache_dir={cache}",
                     f"trainer.train_iters={ITERS}", *extra]


def test_sigkill_twice_then_resume_is_bitwise(tmp_path, data_cache):
    whole = bloom_train(args(tmp_path / "whole", data_cache, ["trainer.save_interval=100"]))
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    for checkpoint in (3, 6):
        crashed = bloom_train(args(run, data_cache, ["trainer.save_interval=3"]),
                              kill_when=f"iter_{checkpoint:08d}")
        assert crashed.returncode != 0, "the run finished before it could be killed"
    resumed = bloom_train(args(run, data_cache, ["trainer.save_interval=3"]))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    expected, got = step_losses(tmp_path / "whole"), step_losses(run)
    assert sorted(got) == list(range(1, ITERS + 1))
    assert got == expected  # loss and consumed samples, bitwise, every step
    assert len({consumed for _, consumed in expected.values()}) == ITERS
    sizes = [b[1] - a[1] for a, b in zip([(0, 0)] + list(expected.values()), expected.values())]
    assert sizes[:5] == [4, 4, 6, 6, 8] and sizes[-1] == 8  # the kills at 3 and 6 straddle the rampup


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, data_cache, mode):
    """SIGKILL while the checkpoint of iteration 6 is being written (after this rank's files, before
    the manifest; with async_save in the background writer while training went on): iteration 3
    stays `latest`, and the resumed run repeats the uninterrupted one bitwise."""
    run = tmp_path / "run"
    crashed = bloom_train(args(run, data_cache, ["trainer.save_interval=3", f"trainer.async_save={mode == 'async'}"]),
                          env={"BLOOM_TEST_KILL_DURING_SAVE": "6"})
    assert crashed.returncode != 0
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_00000003"
    assert not (checkpoints / "iter_00000006").exists()
    assert list(checkpoints.glob(".iter_00000006.partial"))  # the half-written one, hidden
    resumed = bloom_train(args(run, data_cache, ["trainer.save_interval=3"]))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "iter_00000003" in resumed.stdout
    whole = bloom_train(args(tmp_path / "whole", data_cache, ["trainer.save_interval=100"]))
    assert step_losses(run) == step_losses(tmp_path / "whole")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_checkpoint_falls_back_and_shape_change_is_refused(tmp_path, data_cache):
    run = tmp_path / "run"
    first = bloom_train(args(run, data_cache, ["trainer.save_interval=3", "trainer.train_iters=6"]))
    assert first.returncode == 0, first.stderr
    _flip_byte(run / "checkpoints" / "iter_00000006" / "model" / "rank00000.safetensors")
    again = bloom_train(args(run, data_cache, ["trainer.save_interval=3"]))
    assert again.returncode == 0, again.stderr
    assert "checksum" in again.stdout and "resumed from" in again.stdout
    assert "iter_00000003" in again.stdout.split("resumed from")[1].splitlines()[0]
    other = bloom_train(args(run, data_cache, ["model.hidden_size=64"]))
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "hidden_size=32" in lines[0] and "hidden_size=64" in lines[0], other.stderr


# -- resumed in new processes of a job, at several layouts and precisions ------------------------

SAVE_AT, LAST = 3, 6


def _whole_and_resumed(rank, layout, cache, tmp, async_save):
    """For fp32 and bf16: an uninterrupted run to LAST, then a new run that starts from the
    first one's checkpoint at SAVE_AT (its own run directory, fresh engine and data loader) and
    continues to LAST. The resumed run's processes have drawn from every random stream since, so
    only what the checkpoint restores can make it repeat the uninterrupted run's dropout masks.
    With async_save the uninterrupted run wrote that checkpoint while its next steps changed the
    weights and moments: only a snapshot taken at the step boundary passes."""
    base = TINY_RUN + DROPOUT + [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}",
                                 f"data.cache_dir={cache}", "trainer.global_batch_size=8",
                                 f"trainer.train_iters={LAST}", f"trainer.save_interval={SAVE_AT}",
                                 f"trainer.async_save={async_save}"]
    for precision in ("fp32", "bf16"):
        whole, resumed = Path(tmp) / precision / "whole", Path(tmp) / precision / "resumed"
        run_trainer(base + [f"trainer.precision={precision}", f"trainer.run_dir={whole}"])
        run_trainer(base + [f"trainer.precision={precision}", f"trainer.run_dir={resumed}",
                       f"trainer.resume={whole / 'checkpoints' / f'iter_{SAVE_AT:08d}'}"])


@pytest.mark.parametrize("layout,async_save", [(Layout(1, 1, 1), False), (Layout(2, 1, 2), True),
                                               (Layout(1, 2, 2), True)],
                         ids=["1-process", "tp2-dp2-async-save", "pp2-dp2-async-save"])
def test_resume_with_dropout_is_bitwise_at_every_layout_and_precision(tmp_path, data_cache, layout, async_save):
    run_processes(_whole_and_resumed, layout, layout, data_cache, str(tmp_path), async_save)
    for precision in ("fp32", "bf16"):
        whole, resumed = (step_losses(tmp_path / precision / run) for run in ("whole", "resumed"))
        assert sorted(whole) == list(range(1, LAST + 1)), precision
        assert sorted(resumed) == list(range(SAVE_AT + 1, LAST + 1)), precision
        for step in resumed:  # loss and consumed samples, bitwise
            assert resumed[step] == whole[step], f"{precision}, step {step}: {resumed[step]} vs {whole[step]}"
