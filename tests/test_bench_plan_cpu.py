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
        # the measured ratio (alone over together), unclamped, and the entry's: it, at least 1
        measured = row["rates"]["solo_speedup"]
        assert 0 < measured < math.inf
        assert gpu.solo_speedup == round(max(1.0, measured), 3)
        assert yaml.safe_load(open(row["hardware"]))["name"] == "cpu-measured"
    rows = [(r["layout"], r["micro_batches"]) for r in result["rows"]]
    assert rows == [("PP2", 1), ("PP2", 2), ("PP2", 4), ("PP2", 8), ("TP2", 8), ("DP2", 4)]
    for row in result["rows"]:
        assert row["measured"] > 0 and row["predicted"] > 0 and math.isfinite(row["ratio"])
    printed = bench_plan_cpu.report(result, args).splitlines()
    table = [line for line in printed if line.startswith(("PP2", "TP2", "DP2"))]
    assert [tuple(line.split()[:2]) for line in table] == [(name, str(m)) for name, m in rows]


def test_solo_speedup_is_written_as_measured_and_at_least_1(tmp_path):
    """A process measured slower alone than with its peer (noise on a shared machine) is not made
    to predict a slowdown: the entry writes 1; a speedup is written as measured."""
    rates = {"step_gemms": [[64, 64, 64, 10, 1e-4]], "memory_gbs": 10.0, "elementwise_gbs": 2.0,
             "allreduce_gbs": 1.0, "allreduce_latency_s": 2e-5}
    for measured, written in [(0.8, 1.0), (1.0, 1.0), (1.6667, 1.667)]:
        entry = bench_plan_cpu.hardware_yaml(dict(rates, solo_speedup=measured), tmp_path / f"{measured}.yaml")
        assert load_gpu(str(entry)).solo_speedup == written
