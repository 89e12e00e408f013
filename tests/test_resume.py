"""Exact resume. A run killed with SIGKILL and resumed (twice, across a batch-size rampup boundary)
reports bitwise the losses and consumed samples of an uninterrupted run at every step; a kill
during a save leaves the previous checkpoint in use; a corrupt checkpoint is detected by its
checksum and the previous one used; a checkpoint of another model shape is refused in one line."""
from pathlib import Path

from tests.bloom_train import TINY_RUN, bloom_train, data_cache, step_losses  # noqa: F401

# Global batch 4 -> 8 in two increments of 2, one every 8 samples: 4, 4, 6, 6, 8, ... (a rampup).
RAMPUP = TINY_RUN + ["trainer.global_batch_size=8", "trainer.rampup_batch_size=[4,2,16]"]
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


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, data_cache):
    run = tmp_path / "run"
    crashed = bloom_train(args(run, data_cache, ["trainer.save_interval=3"]),
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
    _flip_byte(run / "checkpoints" / "iter_00000006" / "model" / "tp00-pp00.safetensors")
    again = bloom_train(args(run, data_cache, ["trainer.save_interval=3"]))
    assert again.returncode == 0, again.stderr
    assert "checksum" in again.stdout and "resumed from" in again.stdout
    assert "iter_00000003" in again.stdout.split("resumed from")[1].splitlines()[0]
    other = bloom_train(args(run, data_cache, ["model.hidden_size=64"]))
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "hidden_size=32" in lines[0] and "hidden_size=64" in lines[0], other.stderr
