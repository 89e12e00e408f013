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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from parallelism.topology import Layout as Topology  # noqa: E402
from tests.multiprocess import run_processes  # noqa: E402
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


def dense_shapes_at(hidden: int, tokens: int, tp: int) -> list:
    """(m, n, k) of the GEMMs [m x k] @ [k x n] a block's four dense layers (QKV, attention dense,
    h->4h, 4h->h) run at this TP: each forward, its input gradient and its weight gradient, which
    sums over the tokens (performance.py linear_times)."""
    shapes = []
    for n, k in ((3 * hidden // tp, hidden), (hidden, hidden // tp), (4 * hidden // tp, hidden), (hidden, 4 * hidden // tp)):
        shapes += [(tokens, n, k), (tokens, k, n), (n, k, tokens)]
    return shapes


COLD_BYTES = 64 * 2 ** 20  # twice this machine's L3 (32 MiB): operands come from memory, as in a step


def _operands(m, n, k) -> list:
    """Enough distinct (a, b) pairs that cycling through them leaves none in cache: a step's GEMMs
    read weights and activations that other kernels have evicted (a hot-cache probe runs ~5% fast)."""
    count = max(2, min(64, COLD_BYTES // (4 * (m * k + k * n))))
    return [(torch.randn(m, k), torch.randn(k, n)) for _ in range(count)]


def _cycling(pairs):
    state = {"i": 0}

    def multiply():
        a, b = pairs[state["i"] % len(pairs)]
        state["i"] += 1
        torch.mm(a, b)
    return multiply


def _matmul_rates(shapes, seconds):
    rates = []
    for m, n, k in shapes:
        multiply = _cycling(_operands(m, n, k))
        dist.barrier()  # both processes multiply at once: they share the cores as in training
        rates.append(2 * m * n * k / _timed(multiply, seconds) / 1e12)
    return rates


def _solo_speedup(shapes, concurrent, seconds) -> float:
    """This process's matmul rate alone (its peer waits in a gloo barrier, as an idle pipeline
    stage waits in a gloo receive) over its rate with the peer multiplying too, at the same shapes."""
    rank, ratios = dist.get_rank(), []
    for turn in range(dist.get_world_size()):
        dist.barrier()
        if rank == turn:
            for (m, n, k), rate in zip(shapes, concurrent):
                multiply = _cycling(_operands(m, n, k))
                multiply()
                times = []
                start = time.perf_counter()
                while time.perf_counter() - start < seconds or len(times) < 3:
                    t0 = time.perf_counter()
                    multiply()
                    times.append(time.perf_counter() - t0)
                ratios.append(2 * m * n * k / statistics.median(times) / 1e12 / rate)
        dist.barrier()
    return statistics.median(ratios)


def _memory_gbs(seconds) -> float:
    """A streaming add over 64 MiB operands: read two, write one."""
    a, b, c = (torch.ones(16 * 2 ** 20) for _ in range(3))
    dist.barrier()
    return 3 * a.numel() * 4 / _timed(lambda: torch.add(a, b, out=c), seconds) / 1e9


def _elementwise_gbs(hidden, heads, seq, micro, seconds) -> float:
    """The model's own eager elementwise kernels on one micro-batch, forward and backward: two
    LayerNorms, two bias-adds with the residual, the bias-GeLU, the Q/K/V and context layout
    copies, the attention's scale + ALiBi + causal mask + softmax; in the bytes performance.py
    (section 2, no dropout, TP 1, fp32) counts for them, forward and backward."""
    from training.model.alibi import relative_alibi_bias
    from training.model.kernels import bias_gelu_eager, causal_mask

    head_dim = hidden // heads
    x = torch.randn(micro, seq, hidden, requires_grad=True)
    norm, bias = torch.nn.LayerNorm(hidden), torch.zeros(hidden, requires_grad=True)
    ffn, ffn_bias = torch.randn(micro, seq, 4 * hidden, requires_grad=True), torch.zeros(4 * hidden, requires_grad=True)
    qkv = torch.randn(micro, seq, heads, 3, head_dim, requires_grad=True)
    context = torch.randn(micro, heads, seq, head_dim, requires_grad=True)
    scores = torch.randn(micro, heads, seq, seq, requires_grad=True)
    slopes, mask = torch.rand(heads), causal_mask(seq, "cpu")

    def block():
        outs = [norm(x), norm(x), x + (x + bias), x + (x + bias), bias_gelu_eager(ffn, ffn_bias)]
        outs += [qkv[:, :, :, i].transpose(1, 2).contiguous() for i in range(3)]
        outs.append(context.transpose(1, 2).reshape(micro, seq, hidden))
        biased = scores / head_dim ** 0.5 + relative_alibi_bias(slopes, seq)
        outs.append(torch.softmax(biased.masked_fill(mask, torch.finfo(torch.float32).min), dim=-1))
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    u, a = micro * seq * hidden, heads * seq * seq * micro
    forward_bytes = 4 * (4 * u + 5 * u + 8 * u + 8 * u + 2 * a)
    dist.barrier()
    return (1 + performance.ELEMENTWISE_BACKWARD) * forward_bytes / _timed(block, seconds) / 1e9


def _fit_latency_bandwidth(sizes, times) -> tuple:
    """Least squares time = latency + bytes / bandwidth; (latency s, bandwidth GB/s)."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(times) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, times)) / sum((x - mx) ** 2 for x in sizes)
    return max(0.0, my - slope * mx), 1 / slope / 1e9


SIZES = [2 ** k for k in range(12, 25, 4)]  # 4 KiB .. 16 MiB


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


def probe(hidden: int, heads: int, seq: int, micro: int, tp: int, seconds: float) -> dict:
    """This process's rates, measured with its peer at the same time (both ranks call it): the
    dense matmuls at this layout's shapes, the memory, the model's elementwise kernels, gloo."""
    shapes = dense_shapes_at(hidden, seq * micro, tp)
    rank = dist.get_rank()
    matmul = _matmul_rates(shapes, seconds / 3)  # 12 shapes: a third of the time each
    return {"shapes": shapes, "matmul_tflops": matmul, "solo_speedup": _solo_speedup(shapes, matmul, seconds / 3),
            "memory_gbs": _memory_gbs(seconds),
            "elementwise_gbs": _elementwise_gbs(hidden, heads, seq, micro, seconds),
            "allreduce": _allreduce(rank, seconds), "p2p": _p2p(rank, seconds)}


def combine(probes: list) -> dict:
    """One process's rates from every rank's probes (before and after the steps): the median, so
    that one probe struck by another job's burst (the machine is shared) does not set a rate."""
    middle = statistics.median
    return {
        "shapes": probes[0]["shapes"],
        "matmul_tflops": [middle([p["matmul_tflops"][i] for p in probes]) for i in range(len(probes[0]["shapes"]))],
        "solo_speedup": middle([p["solo_speedup"] for p in probes]),
        "memory_gbs": middle([p["memory_gbs"] for p in probes]),
        "elementwise_gbs": middle([p["elementwise_gbs"] for p in probes]),
        "allreduce_latency_s": middle([p["allreduce"][0] for p in probes]),
        "allreduce_gbs": middle([p["allreduce"][1] for p in probes]),
        "p2p_latency_s": middle([p["p2p"][0] for p in probes]), "p2p_gbs": middle([p["p2p"][1] for p in probes]),
    }


def gemm_peak(gemms: list) -> float:
    """predict() runs a GEMM at peak x eta(n, k): the peak at which the model's time for the GEMMs
    a step ran (every rank's, every shape) equals the time they took in it."""
    flops = [2 * m * n * k * calls for m, n, k, calls, _ in gemms]
    return (sum(f / performance._eta(n, k) for f, (_, n, k, _, _) in zip(flops, gemms))
            / sum(seconds for *_, seconds in gemms) / 1e12)


def step_gemm_tflops(gemms: list) -> float:
    return sum(2 * m * n * k * calls for m, n, k, calls, _ in gemms) / sum(g[4] for g in gemms) / 1e12


def hardware_yaml(rates: dict, path: Path) -> Path:
    """The measured rates as a catalogue entry, converted the way performance.py reads each key."""
    peak = gemm_peak(rates["step_gemms"])
    entry = {
        "name": "cpu-measured",
        "peak_tflops": {"fp16": None, "bf16": None, "fp32": round(peak, 5)},
        "memory_gib": round(_host_memory_gib(), 1),
        "hbm_gbs": round(rates["memory_gbs"] / performance.ETA_HBM, 3),
        "elementwise_gbs": round(rates["elementwise_gbs"], 3),  # read as is (performance.py section 2)
        # an all-reduce over 2 ranks moves the message once each way: link one-way = bytes / time;
        # performance.py reads nvlink_gbs as both directions together, times ETA_LINK
        "nvlink_gbs": round(2 * rates["allreduce_gbs"] / performance.ETA_LINK, 3),
        "network_gbs": round(rates["allreduce_gbs"] / performance.ETA_LINK, 3),
        "gpus_per_node": 2,
        "solo_speedup": round(max(1.0, rates["solo_speedup"]), 3),  # performance.py section 7
        "latency_us": round(rates["allreduce_latency_s"] * 1e6, 1),  # a collective's start-up
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
