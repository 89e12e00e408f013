"""The performance model's mechanisms, measured here: predicted against measured tokens/s of 2-process
layouts of a small BLOOM on this CPU machine, in one run.

    python benchmarks/bench_plan_cpu.py [--hidden 512] [--layers 4] [--heads 8] [--seq 256]
                                        [--global-batch 8] [--steps 4] [--warmup 1] [--out DIR]

1. Rates: two processes (one torch thread each, as the training runs: 2 processes on 2 cores)
   measure at the same time this machine's fp32 matmul rate at the shapes the model runs (its
   dense GEMMs at TP 1 and 2), its memory bandwidth (a streaming add), and gloo's all-reduce and
   point-to-point bandwidth and latency between them (time = latency + bytes / bandwidth, fitted
   over message sizes). They are written as a hardware YAML (OUT/cpu-measured.yaml, the keys of
   configs/hardware/cpu.yaml; launcher.gpu_type accepts its path), each rate converted the way
   training/plan/performance.py reads it back (its efficiency constants divided out), so the
   model sees exactly the measured rates.
2. Runs: the project's engine (tests/train_steps.py make_engine / train: BloomEngine, DeepSpeed,
   its pipeline engine at PP 2) trains the same model at the same global batch as PP2 with 1, 2,
   4 and 8 micro-batches (the bubble shrinks from 1/2 to 1/9), TP2 and DP2; tokens/s is the
   global batch's tokens over the median of the timed steps (after warm-up steps).
3. Prediction: training/plan/performance.py's predict() for each layout, with the measured entry
   and DeepSpeed's engine (the planner's choice), nothing fitted to the runs.

Printed: one table, layout, micro-batches, measured and predicted tokens/s, their ratio, and
whether within 20%; and the measured rates. Nothing is asserted: the README keeps the table.
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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from parallelism.topology import Layout as Topology  # noqa: E402
from tests.multiprocess import run_processes  # noqa: E402
from training.plan import performance  # noqa: E402

TOLERANCE = 0.20
PAIR = Topology(1, 1, 2)  # the rate probes: 2 processes, no model parallelism needed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout (median counts)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per layout first")
    parser.add_argument("--probe-seconds", type=float, default=0.5, help="time spent on each rate probe")
    parser.add_argument("--out", default=None, help="folder for the measured YAML and results (default: a temp dir)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- 1. rates
def _timed(fn, seconds: float) -> float:
    """Median seconds of fn() over repeats filling about `seconds` (one call first, untimed). Both
    processes agree on the count (the slower one's), so a collective fn pairs up call for call."""
    t0 = time.perf_counter()
    fn()
    first = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    repeats = int(min(1000, max(3, seconds / max(first.item(), 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dense_shapes(hidden: int, tokens: int) -> list:
    """(m, n, k) of a block's four dense matmuls at TP 1 and TP 2: QKV, attention dense, h->4h, 4h->h."""
    shapes = []
    for tp in (1, 2):
        shapes += [(tokens, 3 * hidden // tp, hidden), (tokens, hidden, hidden // tp),
                   (tokens, 4 * hidden // tp, hidden), (tokens, hidden, 4 * hidden // tp)]
    return shapes


def _matmul_rates(shapes, seconds):
    rates = []
    for m, n, k in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        dist.barrier()  # both processes multiply at once: they share the cores as in training
        rates.append(2 * m * n * k / _timed(lambda: torch.mm(a, b), seconds) / 1e12)
    return rates


def _memory_gbs(seconds) -> float:
    """A streaming add over 64 MiB operands: read two, write one."""
    a, b, c = (torch.ones(16 * 2 ** 20) for _ in range(3))
    dist.barrier()
    return 3 * a.numel() * 4 / _timed(lambda: torch.add(a, b, out=c), seconds) / 1e9


def _fit_latency_bandwidth(sizes, times) -> tuple:
    """Least squares time = latency + bytes / bandwidth; (latency s, bandwidth GB/s)."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(times) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, times)) / sum((x - mx) ** 2 for x in sizes)
    return max(0.0, my - slope * mx), 1 / slope / 1e9


SIZES = [2 ** k for k in range(12, 25, 2)]  # 4 KiB .. 16 MiB


def _allreduce(rank, seconds):
    times = []
    for size in SIZES:
        x = torch.ones(size // 4)
        dist.barrier()
        times.append(_timed(lambda: dist.all_reduce(x), seconds))
    return _fit_latency_bandwidth(SIZES, times)


def _p2p(rank, seconds):
    """One-way time of a send from 0 to 1: half a ping-pong."""
    times = []
    for size in SIZES:
        x = torch.ones(size // 4)

        def ping_pong():
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(x, 0)
                dist.send(x, 0)
        dist.barrier()
        times.append(_timed(ping_pong, seconds) / 2)
    return _fit_latency_bandwidth(SIZES, times)


def _rates_worker(rank, hidden, tokens, seconds, out):
    matmul = _matmul_rates(dense_shapes(hidden, tokens), seconds)
    memory = _memory_gbs(seconds)
    allreduce = _allreduce(rank, seconds)
    p2p = _p2p(rank, seconds)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"matmul_tflops": matmul, "memory_gbs": memory, "allreduce": allreduce, "p2p": p2p}, f)


def measure_rates(args, out_dir: Path) -> dict:
    out = out_dir / "rates.json"
    tokens = args.seq * max(1, args.global_batch // 8)  # a micro-batch's rows at the middle micro-batch size
    run_processes(_rates_worker, PAIR, args.hidden, tokens, args.probe_seconds, str(out))
    per_rank = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    shapes = dense_shapes(args.hidden, tokens)
    # each process's rate: both ran at once, so the mean of the two is one process's share of the machine
    matmul = [sum(r["matmul_tflops"][i] for r in per_rank) / 2 for i in range(len(shapes))]
    return {
        "shapes": shapes, "matmul_tflops": matmul,
        "memory_gbs": sum(r["memory_gbs"] for r in per_rank) / 2,
        "allreduce_latency_s": per_rank[0]["allreduce"][0], "allreduce_gbs": per_rank[0]["allreduce"][1],
        "p2p_latency_s": per_rank[0]["p2p"][0], "p2p_gbs": per_rank[0]["p2p"][1],
    }


def hardware_yaml(rates: dict, path: Path) -> Path:
    """The measured rates as a catalogue entry, converted the way performance.py reads each key."""
    # predict() runs a GEMM at peak x eta(n, k): the peak is the measured rate with eta divided out
    # (the median over the model's shapes, so neither TP's shapes decide alone).
    peak = statistics.median(r / performance._eta(n, k) for r, (_, n, k) in zip(rates["matmul_tflops"], rates["shapes"]))
    entry = {
        "name": "cpu-measured",
        "peak_tflops": {"fp16": None, "bf16": None, "fp32": round(peak, 5)},
        "memory_gib": round(_host_memory_gib(), 1),
        "hbm_gbs": round(rates["memory_gbs"] / performance.ETA_HBM, 3),
        # an all-reduce over 2 ranks moves the message once each way: link one-way = bytes / time;
        # performance.py reads nvlink_gbs as both directions together, times ETA_LINK
        "nvlink_gbs": round(2 * rates["allreduce_gbs"] / performance.ETA_LINK, 3),
        "network_gbs": round(rates["allreduce_gbs"] / performance.ETA_LINK, 3),
        "gpus_per_node": 2,
    }
    path.write_text("# Measured by benchmarks/bench_plan_cpu.py on this machine "
                    f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).\n" + yaml.safe_dump(entry, sort_keys=False))
    return path


def _host_memory_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2 ** 20
    return 1.0


# ---------------------------------------------------------------- 2. runs
def layouts(global_batch: int) -> list:
    """(name, topology, micro-batch size): PP2 at 1, 2, 4, 8 micro-batches, TP2, DP2, one global batch."""
    rows = [(f"PP2", Topology(1, 2, 1), global_batch // m) for m in (1, 2, 4, 8) if global_batch % m == 0]
    half = max(1, global_batch // 2)
    rows += [("TP2", Topology(2, 1, 1), half), ("DP2", Topology(1, 1, 2), half)]
    return rows


def overrides(args, topo: Topology, micro: int) -> list:
    return [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
            f"data.seq_length={args.seq}", f"trainer.micro_batch_size={micro}",
            f"trainer.global_batch_size={args.global_batch}", f"parallel.tp={topo.tp}", f"parallel.pp={topo.pp}",
            "parallel.zero_stage=1", "trainer.precision=fp32"]


def _train_worker(rank, topo, override, warmup, steps, out):
    from tests.train_steps import make_engine, train

    cfg, engine = make_engine(override, topo)
    train(cfg, engine, topo, 0, warmup)
    times = []
    for step in range(warmup, warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        train(cfg, engine, topo, step, 1)
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def measure_run(args, topo: Topology, micro: int, out: Path) -> float:
    """Tokens/s of the engine at this layout: the global batch's tokens over the median step."""
    run_processes(_train_worker, topo, topo, overrides(args, topo, micro), args.warmup, args.steps, str(out))
    return args.global_batch * args.seq / statistics.median(json.loads(out.read_text()))


# ---------------------------------------------------------------- 3. prediction
def predict_run(args, topo: Topology, micro: int, gpu) -> performance.Prediction:
    from training.config.loader import load_config
    from training.plan.planner import ENGINE, model_shape
    from tests.train_steps import TINY

    cfg = load_config(TINY + overrides(args, topo, micro))
    shape = model_shape(cfg, topo.tp)
    lay = performance.Layout(topo.tp, topo.pp, topo.dp, micro, args.global_batch, recompute=cfg.model.recompute,
                             zero_stage=cfg.parallel.zero_stage, precision="fp32")
    return performance.predict(shape, lay, gpu, gpus_per_node=2, engine=ENGINE)


def table(rows: list) -> str:
    lines = [f"{'layout':<7} {'micro-batches':>13} {'measured tok/s':>15} {'predicted tok/s':>16} {'ratio':>6}  within 20%",
             "-" * 72]
    for r in rows:
        lines.append(f"{r['layout']:<7} {r['micro_batches']:>13} {r['measured']:>15.1f} {r['predicted']:>16.1f} "
                     f"{r['ratio']:>6.2f}  {'yes' if r['within'] else 'NO'}")
    return "\n".join(lines)


def run(args) -> dict:
    from training.plan.hardware import load_gpu

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench_plan_cpu."))
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rates = measure_rates(args, out_dir)
    gpu = load_gpu(str(hardware_yaml(rates, out_dir / "cpu-measured.yaml")))
    rows = []
    for name, topo, micro in layouts(args.global_batch):
        measured = measure_run(args, topo, micro, out_dir / f"{name}-mbs{micro}.json")
        pred = predict_run(args, topo, micro, gpu)
        ratio = pred.tokens_per_sec / measured
        rows.append({"layout": name, "micro_batches": args.global_batch // (micro * topo.dp), "micro_batch_size": micro,
                     "measured": measured, "predicted": pred.tokens_per_sec, "ratio": ratio,
                     "within": abs(ratio - 1) <= TOLERANCE, "parts_s": pred.parts_s})
    result = {"rates": rates, "hardware": str(out_dir / "cpu-measured.yaml"), "rows": rows,
              "spread": max(r["measured"] for r in rows) / min(r["measured"] for r in rows),
              "seconds": time.perf_counter() - start, "load_average": os.getloadavg()}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def report(result: dict, args) -> str:
    r = result["rates"]
    rates = (f"measured: fp32 matmul {min(r['matmul_tflops']):.3f}-{max(r['matmul_tflops']):.3f} TFLOP/s per process "
             f"(dense shapes at TP 1-2), memory {r['memory_gbs']:.2f} GB/s per process, gloo all-reduce "
             f"{r['allreduce_gbs']:.2f} GB/s + {r['allreduce_latency_s'] * 1e6:.0f} us, p2p "
             f"{r['p2p_gbs']:.2f} GB/s + {r['p2p_latency_s'] * 1e6:.0f} us")
    model = (f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, seq {args.seq}, "
             f"global batch {args.global_batch}, fp32, ZeRO-1; median of {args.steps} steps after {args.warmup}")
    within = sum(row["within"] for row in result["rows"])
    tail = (f"{within}/{len(result['rows'])} within 20%; measured spread {result['spread']:.2f}x; "
            f"{result['seconds']:.0f} s; load average {', '.join(f'{x:.2f}' for x in result['load_average'])}; "
            f"entry {result['hardware']}")
    return "\n".join([model, rates, table(result["rows"]), tail])


def main(argv=None) -> None:
    args = parse_args(argv)
    print(report(run(args), args))


if __name__ == "__main__":
    main()
