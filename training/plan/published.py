"""The published runs of training/plan/data/published_runs.yaml as performance-model inputs."""
from pathlib import Path
from typing import List, Tuple

import dataclasses

import yaml

from training.plan.hardware import GPU, load_gpu
from training.plan.performance import Layout, Shape

PUBLISHED = Path(__file__).parent / "data" / "published_runs.yaml"


def published_runs() -> List[Tuple[dict, Shape, Layout, GPU]]:
    """(row, shape, layout, the run's GPU with its cluster's network where the row states it)."""
    raw = yaml.safe_load(PUBLISHED.read_text())
    rows = []
    for r in raw["runs"]:
        shape = Shape(r["hidden"], r["layers"], r["heads"], r["vocab"], r["seq"])
        dp = r["gpus"] // (r["tp"] * r["pp"])
        layout = Layout(r["tp"], r["pp"], dp, r["micro"], r["batch"], recompute="full",
                        zero_stage=r.get("zero", 0), precision=r.get("precision", "fp16"),
                        chunks=r["chunks"], dp_overlap=(r["ddp"] == "torch"),
                        layers_per_stage=tuple(r["layers_per_stage"]) if "layers_per_stage" in r else None)
        base = load_gpu(raw["gpu"])
        if "network_gbs" in r:
            base = dataclasses.replace(base, network_gbs=float(r["network_gbs"]))
        rows.append((r, shape, layout, base))
    return rows
