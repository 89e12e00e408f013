"""bloom-plot on two runs whose metrics.jsonl the product's MetricsLogger wrote (as training does):

- the five PNGs are written and hold each run's curve: pixels of each run's colour in every
  figure (counted in the PNG read back), none of a run that is not there;
- the figures' lines carry exactly the logged values: training loss, lr and batch size (the
  rampup), grad norm with the skipped step marked, tokens/s and TFLOPs, the blend's and each
  language's validation loss;
- a directory without metrics.jsonl is one line naming it, status 2.
"""
import math

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from launch import plot_cli
from training import plots
from training.config.schema import LoggingConfig
from training.metrics import MetricsLogger

LANGUAGES = ("en", "fr", "yo")


def _write_run(run_dir, scale: float, steps: int = 30) -> list:
    """A run's metrics as the trainer logs them: one record per step, an eval record every 10."""
    logger = MetricsLogger(run_dir, LoggingConfig(tensorboard=False, wandb=False), is_writer=True)
    records = []
    for step in range(1, steps + 1):
        record = {"lm_loss": scale * (9 - 4 * math.log(step) / math.log(steps)), "lr": 3e-4 * scale * min(1, step / 10),
                  "grad_norm": scale * (1 + 5 * (step == 17)), "skipped": step == 17,
                  "global_batch_size": 16 if step < 10 * scale else 32, "tokens_per_sec": 900 + 10 * scale * step,
                  "tflops_per_device": 0.01 * scale}
        logger.log(step, record)
        records.append({"step": step, **record})
        if step % 10 == 0:
            valid = {"valid_loss": scale * (8 - step / 10), **{f"valid/{lang}_loss": scale * (8.5 - step / 10 + i)
                                                              for i, lang in enumerate(LANGUAGES)}}
            logger.log(step, valid)
            records.append({"step": step, **valid})
    logger.close()
    return records


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"run-a": (root / "run-a", _write_run(root / "run-a", 1.0)),
            "run-b": (root / "run-b", _write_run(root / "run-b", 1.3))}


def _pixels_of(png, color) -> int:
    image = mpimg.imread(png)[..., :3]
    return int((np.abs(image - np.array(to_rgb(color))).sum(axis=-1) < 0.05).sum())


def test_bloom_plot_writes_every_figure_with_both_runs(two_runs, tmp_path, capsys):
    assert plot_cli.main([str(d) for d, _ in two_runs.values()] + ["--out", str(tmp_path / "fig")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "fig" / f"{name}.png") for name in plots.FIGURES)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name in ("loss", "lr_batch", "grad_norm", "throughput"):
        png = tmp_path / "fig" / f"{name}.png"
        for color in cycle[:2]:  # run-a, run-b
            assert _pixels_of(png, color) > 100, f"{name}.png: no curve in {color}"
        assert _pixels_of(png, cycle[2]) < 20, f"{name}.png: a third run's colour"


def _lines(axes) -> dict:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}


def test_figures_hold_the_logged_values(two_runs):
    runs = {label: plots.read_metrics(directory) for label, (directory, _) in two_runs.items()}
    figures = plots.figures(runs)
    for label, (_, logged) in two_runs.items():
        train = [r for r in logged if "lm_loss" in r]
        steps = [r["step"] for r in train]
        loss_lines = _lines(figures["loss"].axes[0])
        assert loss_lines[label] == (steps, [r["lm_loss"] for r in train])
        lr, batch = (_lines(a)[label] for a in figures["lr_batch"].axes)
        assert lr == (steps, [r["lr"] for r in train]) and batch == (steps, [r["global_batch_size"] for r in train])
        grad = figures["grad_norm"].axes[0]
        assert _lines(grad)[label] == (steps, [r["grad_norm"] for r in train])
        assert _lines(grad)[f"{label}: skipped"][0] == [17]
        tokens, tflops = (_lines(a)[label] for a in figures["throughput"].axes)
        assert tokens[1] == [r["tokens_per_sec"] for r in train] and tflops[1] == [r["tflops_per_device"] for r in train]
        evals = [r for r in logged if "valid_loss" in r]
        assert _lines(figures["valid_loss"].axes[0])[f"{label}: blend"] == (
            [r["step"] for r in evals], [r["valid_loss"] for r in evals])
    # Every language of both runs: 3 thin lines per run besides the blends.
    assert len(figures["valid_loss"].axes[0].get_lines()) == 2 * (1 + len(LANGUAGES))
    for figure in figures.values():
        plt.close(figure)


def test_a_directory_without_metrics_is_one_line(tmp_path, capsys):
    assert plot_cli.main([str(tmp_path), "--out", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "metrics.jsonl" in err[0]
