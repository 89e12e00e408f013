"""benchmarks/bench_plan_cpu.py's whole code path on a tiny shape, one timed step per layout: each
launch's rate probes write a hardware YAML that the catalogue loader accepts, every layout (PP2 at 1, 2, 4, 8
micro-batches, TP2, DP2) is trained by the engine and predicted, and the table has a row for each.
No timing is asserted (the machine is shared): the benchmark's numbers are the README's."""
import math

import yaml

from benchmarks import bench_plan_cpu
from training.plan.hardware import load_gpu

TINY_ARGS = ["--hidden", "64", "--layers", "2", "--heads", "4", "--seq", "32", "--global-batch", "8",
             "--steps", "1", "--warmup", "1", "--probe-seconds", "0.02"]


def test_benchmark_prints_every_row(tmp_path):
    args = bench_plan_cpu.parse_args(TINY_ARGS + ["--out", str(tmp_path)])
    result = bench_plan_cpu.run(args)
    for row in result["rows"]:
        gpu = load_gpu(row["hardware"])  # each launch's measured entry is a valid catalogue file
        assert gpu.peak("fp32") > 0 and gpu.hbm_gbs > 0 and gpu.nvlink_gbs > 0 and gpu.elementwise_gbs > 0
        assert gpu.solo_speedup >= 1
        assert yaml.safe_load(open(row["hardware"]))["name"] == "cpu-measured"
    rows = [(r["layout"], r["micro_batches"]) for r in result["rows"]]
    assert rows == [("PP2", 1), ("PP2", 2), ("PP2", 4), ("PP2", 8), ("TP2", 8), ("DP2", 4)]
    for row in result["rows"]:
        assert row["measured"] > 0 and row["predicted"] > 0 and math.isfinite(row["ratio"])
    printed = bench_plan_cpu.report(result, args).splitlines()
    table = [line for line in printed if line.startswith(("PP2", "TP2", "DP2"))]
    assert [tuple(line.split()[:2]) for line in table] == [(name, str(m)) for name, m in rows]
