"""Figures of one or more runs from their metrics.jsonl (training/metrics.py writes it), for bloom-plot.

Each figure overlays the runs, one colour per run (its run directory's name in the legend):

    loss.png        training loss (lm_loss) per iteration
    valid_loss.png  validation loss on the blend (thick) and per language (thin, one colour per
                    language, one line style per run)
    lr_batch.png    learning rate, and global batch size (the rampup), per iteration
    grad_norm.png   gradient norm per iteration, skipped steps marked with x at the top
    throughput.png  tokens/s and model TFLOPs per device (and MFU where the run logged it)

metrics.jsonl holds each iteration once after a resume (the lines of a rolled-back range are
removed), so the curves need no deduplication; a record missing a value leaves a gap.
"""
import json
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster's login node
import matplotlib.pyplot as plt  # noqa: E402

from training.metrics import METRICS_FILE  # noqa: E402

FIGURES = ("loss", "valid_loss", "lr_batch", "grad_norm", "throughput")


class PlotError(ValueError):
    """A run directory that cannot be plotted; the message names it."""


def read_metrics(run_dir: Path) -> List[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{run_dir}: no {METRICS_FILE} (not a run directory, or it never logged a step)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise PlotError(f"{path}:{number}: not a JSON line") from None
    return records


def series(records: List[dict], key: str) -> tuple:
    """(steps, values) of the records that have `key`."""
    points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(run_dirs: List[Path], out: Path) -> Dict[str, Path]:
    """Write every figure for these runs into `out`; returns {figure name: PNG path}."""
    runs = {Path(d).resolve().name or str(d): read_metrics(d) for d in run_dirs}
    if len(runs) != len(run_dirs):
        runs = {str(d): read_metrics(d) for d in run_dirs}  # two runs with the same directory name
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, figure in figures(runs).items():
        path = out / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written[name] = path
    return written


def figures(runs: Dict[str, List[dict]]) -> dict:
    """{figure name: matplotlib Figure} for {run label: its metrics records}."""
    return {name: globals()[f"_{name}"](runs) for name in FIGURES}


def _colors(runs: dict) -> dict:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {run: cycle[i % len(cycle)] for i, run in enumerate(runs)}


def _panel(axes, runs: dict, key: str, ylabel: str, log: bool = False) -> None:
    for run, color in _colors(runs).items():
        steps, values = series(runs[run], key)
        if steps:
            axes.plot(steps, values, color=color, label=run)
    axes.set_ylabel(ylabel)
    if log:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)


def _legend(axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)


def _figure(rows: int = 1):
    figure, axes = plt.subplots(rows, 1, figsize=(8, 3.2 * rows), sharex=True, squeeze=False)
    axes[-1, 0].set_xlabel("iteration")  # the panels share it
    return figure, list(axes[:, 0])


def _loss(runs: dict):
    figure, (axes,) = _figure()
    _panel(axes, runs, "lm_loss", "training loss")
    _legend(axes)
    axes.set_title("training loss")
    return figure


def _valid_loss(runs: dict):
    figure, (axes,) = _figure()
    styles = ["-", "--", ":", "-."]
    languages = sorted({k for records in runs.values() for r in records for k in r
                        if k.startswith("valid/") and k.endswith("_loss")})
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, color) in enumerate(_colors(runs).items()):
        steps, values = series(runs[run], "valid_loss")
        if steps:
            axes.plot(steps, values, color=color, linewidth=2.5, marker="o", label=f"{run}: blend")
        for j, key in enumerate(languages):
            steps, values = series(runs[run], key)
            if steps:
                axes.plot(steps, values, color=cycle[j % len(cycle)], linewidth=0.8,
                          linestyle=styles[i % len(styles)], alpha=0.7)
    axes.set_ylabel("validation loss")
    axes.set_title(f"validation loss: blend (thick) and {len(languages)} languages (thin)")
    _legend(axes)
    axes.grid(alpha=0.3)
    return figure


def _lr_batch(runs: dict):
    figure, (top, bottom) = _figure(2)
    _panel(top, runs, "lr", "learning rate")
    _panel(bottom, runs, "global_batch_size", "global batch size")
    _legend(top)
    top.set_title("learning rate and batch size")
    return figure


def _grad_norm(runs: dict):
    figure, (axes,) = _figure()
    _panel(axes, runs, "grad_norm", "gradient norm", log=True)
    for run, color in _colors(runs).items():
        skipped = [r["step"] for r in runs[run] if r.get("skipped")]
        if skipped:
            axes.plot(skipped, [1.0] * len(skipped), "x", color=color, markersize=8,
                      transform=axes.get_xaxis_transform(), label=f"{run}: skipped")
    _legend(axes)
    axes.set_title("gradient norm (x: skipped steps)")
    return figure


def _throughput(runs: dict):
    has_mfu = any("mfu" in r for records in runs.values() for r in records)
    figure, panels = _figure(3 if has_mfu else 2)
    _panel(panels[0], runs, "tokens_per_sec", "tokens / s")
    _panel(panels[1], runs, "tflops_per_device", "model TFLOPs / device")
    if has_mfu:
        _panel(panels[2], runs, "mfu", "MFU")
    _legend(panels[0])
    panels[0].set_title("throughput")
    return figure
