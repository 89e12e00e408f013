"""This CPU machine's rates as the performance model reads them, measured by two processes at once
(benchmarks/bench_plan_cpu.py calls probe() in each launch, before and after its timed steps):
fp32 matmuls at a layout's GEMM shapes (together, then alone: solo_speedup), memory bandwidth,
the model's elementwise kernels, gloo's all-reduce and point-to-point; and the catalogue entry
(configs/hardware/cpu.yaml's keys) they make."""
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from training.plan import performance


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
