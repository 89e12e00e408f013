"""The performance model's mechanisms, measured here: predicted against measured tokens/s of 2-process
layouts of a small BLOOM on this CPU machine, in one run.

    python benchmarks/bench_plan_cpu.py [--hidden 512] [--layers 4] [--heads 8] [--seq 256]
                                        [--micro-batch 1] [--global-batch 16] [--steps 5]
                                        [--warmup 1] [--out DIR]

1. Runs: the project's engine (tests/train_steps.py make_engine / train: BloomEngine, DeepSpeed,
   its pipeline engine at PP 2) trains the same model, micro-batches of the same size in every
   row, as PP2 with 1, 2, 4 and 8 micro-batches per step (the pipeline experiment of Narayanan
   et al. 2021, Sec. 5.3: the micro-batch fixed, the global batch its count times its size; the
   bubble shrinks from 1/2 to 1/9 while the step's own costs, the optimizer, the tied embedding's
   all-reduce, are shared by more samples), then TP2 and DP2 at --global-batch samples, one
   launch of 2 processes each; tokens/s is the global batch's tokens over the median of the
   timed steps (after warm-up steps).
2. Rates: in each launch, just before and just after its timed steps (the machine is shared with
   other jobs, so the rates are those the steps saw), the two processes (one torch thread each,
   2 processes on 2 cores) measure at the same time the fp32 matmul rate at that layout's dense
   GEMM shapes (its micro-batch, its TP split; each layer's forward, input-gradient and
   weight-gradient GEMMs, their operands cycled through more memory than the cache holds, as a
   step's are), then each alone (its peer waiting in gloo, as an
   idle pipeline stage does: the ratio is performance.py's solo_speedup, section 7, about 1 on a
   quiet machine, up to 2 when other jobs share the cores), the memory
   bandwidth (a streaming add), the rate
   of the model's own eager elementwise kernels (forward and backward, in the bytes
   performance.py counts for them), and gloo's all-reduce and point-to-point bandwidth and
   latency between them (time = latency + bytes / bandwidth, fitted over message sizes). The
   GEMM rate is measured where the step runs its GEMMs: one more step runs under torch's
   profiler, which times every aten::mm with its shape (the isolated probe's rates, 5-10% higher,
   are printed beside it: a step's GEMMs find their operands evicted by the kernels between
   them, as ETA_GEMM on GPUs is a step's sustained rate, not an isolated GEMM's). The
   median of the two probes of both ranks is written as a hardware YAML (OUT/cpu-measured-*.yaml,
   the keys of configs/hardware/cpu.yaml, which launcher.gpu_type accepts as a path), each rate
   converted the way training/plan/performance.py reads it back (its efficiency constants
   divided out), so the model sees exactly the measured rates.
3. Prediction: training/plan/performance.py's predict() for each layout with that entry and
   DeepSpeed's engine (the planner's choice). Only the GEMMs' own time enters from the runs (as
   the rate above); the step times predicted (bubble, stage imbalance, elementwise work,
   collectives, the optimizer and ZeRO's copies) are never fitted to the timed steps.

Printed: one table, layout, micro-batches, measured and predicted tokens/s, their ratio,
whether within 20%, and the share of the steps the processes waited for a core (the kernel's
schedstat: other jobs' load, near 0 on a quiet machine); the load average; each launch's rates. Nothing is asserted: the README keeps
the table.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from parallelism.topology import Layout as Topology  # noqa: E402
from tests.multiprocess import run_processes  # noqa: E402
from benchmarks.cpu_rates import combine, hardware_yaml, probe, step_gemm_tflops  # noqa: E402
from training.plan import performance  # noqa: E402

TOLERANCE = 0.20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per micro-batch, every row")
    parser.add_argument("--global-batch", type=int, default=16, help="samples per step of TP2 and DP2")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout (median counts)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per layout first")
    parser.add_argument("--probe-seconds", type=float, default=0.2, help="time spent on each rate probe")
    parser.add_argument("--out", default=None, help="folder for the measured YAML and results (default: a temp dir)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- 1. rates
def layouts(micro: int, global_batch: int) -> list:
    """(name, topology, micro-batch size, global batch): PP2 at 1, 2, 4, 8 micro-batches of `micro`
    samples, TP2 and DP2 at `global_batch` samples in micro-batches of `micro`."""
    if global_batch % (2 * micro):
        raise SystemExit(f"bench_plan_cpu: --global-batch {global_batch} is not a multiple of 2 x --micro-batch {micro} (DP2)")
    rows = [("PP2", Topology(1, 2, 1), micro, micro * m) for m in (1, 2, 4, 8)]
    rows += [("TP2", Topology(2, 1, 1), micro, global_batch), ("DP2", Topology(1, 1, 2), micro, global_batch)]
    return rows


def overrides(args, topo: Topology, micro: int, global_batch: int) -> list:
    return [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
            f"data.seq_length={args.seq}", f"trainer.micro_batch_size={micro}",
            f"trainer.global_batch_size={global_batch}", f"parallel.tp={topo.tp}", f"parallel.pp={topo.pp}",
            "parallel.zero_stage=1", "trainer.precision=fp32"]


def _train_worker(rank, topo, override, args, micro, out):
    """Warm-up steps, the rates, the timed steps, the rates again: the machine is shared, so the
    rates the prediction uses are measured by these processes around the steps they predict."""
    from tests.train_steps import make_engine, train

    cfg, engine = make_engine(override, topo)
    train(cfg, engine, topo, 0, args.warmup)
    probes = [probe(args.hidden, args.heads, args.seq, micro, topo.tp, args.probe_seconds)]
    times, waited = [], 0.0
    for step in range(args.warmup, args.warmup + args.steps):
        dist.barrier()
        start, wait = time.perf_counter(), _runqueue_wait_s()
        train(cfg, engine, topo, step, 1)
        dist.barrier()
        times.append(time.perf_counter() - start)
        waited += _runqueue_wait_s() - wait
    probes.append(probe(args.hidden, args.heads, args.seq, micro, topo.tp, args.probe_seconds))
    gemms = _step_gemms(lambda: train(cfg, engine, topo, args.warmup + args.steps, 1))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (probes, waited / sum(times), gemms))
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "probes": [p for ps, _, _ in every for p in ps],
                                         "cpu_wait": sum(w for _, w, _ in every) / len(every),
                                         "step_gemms": [g for _, _, gs in every for g in gs]}))


def _step_gemms(step) -> list:
    """[m, n, k, calls, seconds] of every dense GEMM shape ([m x k] @ [k x n]: aten::mm, the
    linear layers' and the logits') in one more step, under torch's profiler: the rate a step's
    own GEMMs sustain, between the elementwise kernels that evict their operands, which isolated
    GEMMs (the probe) overstate by 5-10% here, as isolated cuBLAS GEMMs overstate a GPU step's
    (performance.py ETA_GEMM)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    out = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key == "aten::mm" and len(event.input_shapes) >= 2 and len(event.input_shapes[0]) == 2:
            (m, k), (_, n) = event.input_shapes[0], event.input_shapes[1]
            out.append([m, n, k, event.count, event.self_cpu_time_total / 1e6])
    return out


def _runqueue_wait_s() -> float:
    """Seconds this thread (torch's one compute thread) has waited for a core while runnable:
    the kernel's schedstat. Near 0 on a quiet machine; the share of a step it grows to says how
    much other jobs took from this run."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def measure_run(args, topo: Topology, micro: int, global_batch: int, out: Path) -> tuple:
    """(tokens/s of the engine at this layout: the global batch's tokens over the median step,
    the rates measured around the steps)."""
    run_processes(_train_worker, topo, topo, overrides(args, topo, micro, global_batch), args, micro, str(out))
    got = json.loads(out.read_text())
    rates = dict(combine(got["probes"]), step_gemms=got["step_gemms"])
    return global_batch * args.seq / statistics.median(got["times"]), rates, got


# ---------------------------------------------------------------- 3. prediction
def predict_run(args, topo: Topology, micro: int, global_batch: int, gpu) -> performance.Prediction:
    from training.config.loader import load_config
    from training.plan.planner import ENGINE, model_shape
    from tests.train_steps import TINY

    cfg = load_config(TINY + overrides(args, topo, micro, global_batch))
    shape = model_shape(cfg, topo.tp)
    lay = performance.Layout(topo.tp, topo.pp, topo.dp, micro, global_batch, recompute=cfg.model.recompute,
                             zero_stage=cfg.parallel.zero_stage, precision="fp32")
    return performance.predict(shape, lay, gpu, gpus_per_node=2, engine=ENGINE)


def table(rows: list) -> str:
    """The README's table; cpu wait: the share of the timed steps the processes spent runnable but
    waiting for a core (other jobs on the machine), the measurement's own noise."""
    lines = [f"{'layout':<7} {'micro-batches':>13} {'measured tok/s':>15} {'predicted tok/s':>16} {'ratio':>6}  "
             f"within 20%  cpu wait", "-" * 82]
    for r in rows:
        lines.append(f"{r['layout']:<7} {r['micro_batches']:>13} {r['measured']:>15.1f} {r['predicted']:>16.1f} "
                     f"{r['ratio']:>6.2f}  {'yes' if r['within'] else 'NO':<10}  {r['cpu_wait']:>7.0%}")
    return "\n".join(lines)


def run(args) -> dict:
    from training.plan.hardware import load_gpu

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench_plan_cpu."))
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    for name, topo, micro, global_batch in layouts(args.micro_batch, args.global_batch):
        m = global_batch // (micro * topo.dp)
        measured, rates, got = measure_run(args, topo, micro, global_batch, out_dir / f"{name}-m{m}.json")
        entry = hardware_yaml(rates, out_dir / f"cpu-measured-{name}-m{m}.yaml")
        pred = predict_run(args, topo, micro, global_batch, load_gpu(str(entry)))
        ratio = pred.tokens_per_sec / measured
        rows.append({"layout": name, "micro_batches": m, "micro_batch_size": micro, "global_batch": global_batch,
                     "measured": measured,
                     "predicted": pred.tokens_per_sec, "ratio": ratio, "within": abs(ratio - 1) <= TOLERANCE,
                     "step_times_s": got["times"], "cpu_wait": got["cpu_wait"], "rates": rates, "hardware": str(entry), "parts_s": pred.parts_s})
    result = {"rows": rows, "spread": max(r["measured"] for r in rows) / min(r["measured"] for r in rows),
              "seconds": time.perf_counter() - start, "load_average": os.getloadavg()}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _rates_line(r: dict) -> str:
    return (f"matmul in the step {step_gemm_tflops(r['step_gemms']):.3f} TFLOP/s, isolated "
            f"{min(r['matmul_tflops']):.3f}-{max(r['matmul_tflops']):.3f} (alone x{r['solo_speedup']:.2f}), memory {r['memory_gbs']:.1f} GB/s, "
            f"elementwise {r['elementwise_gbs']:.2f} GB/s, all-reduce {r['allreduce_gbs']:.2f} GB/s "
            f"+ {r['allreduce_latency_s'] * 1e6:.0f} us, p2p {r['p2p_gbs']:.2f} GB/s + {r['p2p_latency_s'] * 1e6:.0f} us")


def report(result: dict, args) -> str:
    model = (f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, seq {args.seq}, micro-batch "
             f"{args.micro_batch} (global batch: PP2 its micro-batches x {args.micro_batch}, TP2 and DP2 "
             f"{args.global_batch}), fp32, ZeRO-1; median of {args.steps} steps after {args.warmup}; "
             f"rates per process, measured around each layout's steps")
    within = sum(row["within"] for row in result["rows"])
    tail = (f"{within}/{len(result['rows'])} within 20%; measured spread {result['spread']:.2f}x; "
            f"{result['seconds']:.0f} s; load average {', '.join(f'{x:.2f}' for x in result['load_average'])}")
    rates = [f"  {r['layout']} m={r['micro_batches']}: {_rates_line(r['rates'])}" for r in result["rows"]]
    return "\n".join([model, table(result["rows"]), tail, "rates (entries: " + str(Path(result["rows"][0]["hardware"]).parent) + "):"] + rates)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(report(run(args), args))


if __name__ == "__main__":
    main()
