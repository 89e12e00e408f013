"""One table of what this framework achieves on one GPU, beside a plain Hugging Face loop.

    python benchmarks/gpu_check.py [--models bloom-560m bloom-1b7] [--kernels auto eager]
                                   [--recompute none selective] [--seq 2048] [--micro-batch 4]
                                   [--steps 5] [--budget-s 420] [--cpu]

benchmarks/gpu_check.sh is the command to run (it installs what a bare GPU machine lacks first).
On a CUDA GPU, for each model: the framework's training step (BloomEngine, bf16, ZeRO-1, one
process) for every kernels x recompute choice, and the plain HF loop of benchmarks/bench_vs_hf.py
(BloomForCausalLM with SDPA attention swapped in, bf16 autocast over fp32 weights, foreach AdamW,
clipping), each from the same initial weights on the same batches; the first-step losses must
agree (asserted). Dropout is off in both, so that they can. Per row: tokens/s, model TFLOPs per GPU
(Megatron's formula, training/plan/flops.py, recomputation not counted), MFU against the GPU's
dense bf16 peak (the hardware catalogue configs/hardware/, from NVIDIA data sheets) and against the bf16 matmul rate measured here at the start,
the peak memory allocated (torch.cuda.max_memory_allocated) and the plan's estimate for the same
run (training/plan/memory_estimate.py, without its 2 GiB allowance for the CUDA context and
fragmentation, which max_memory_allocated does not see).

Without a GPU (--cpu, or no CUDA device): the same table for a tiny model in fp32 on the CPU, eager
kernels, so that CI runs every part of it; there is no peak to compare with, and no memory reading.
Variants run one after another (a GPU holds one bloom-1b7 with its optimizer at a time); a
variant that would start after --budget-s seconds is listed as skipped, so the run ends in time.
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_vs_hf as bench  # noqa: E402  (sets DS_ACCELERATOR=cpu on a machine without CUDA)

GIB = 2 ** 30

# The reduced CPU version: the table's every column, on a model a CI machine trains in seconds.
CPU_SHAPE = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4"]


def catalogue_entry(device_name: str, memory_gib: float):
    """This GPU's entry in the hardware catalogue (configs/hardware/, the data sheets' dense peaks),
    or None when the catalogue does not hold it (an H100 PCIe or NVL has lower peaks than the SXM)."""
    from training.plan.hardware import load_gpu

    name = device_name.upper()
    if "H100" in name and ("PCIE" in name or "NVL" in name):
        return None
    for key, entry in (("H200", "H200-141GB"), ("H100", "H100-80GB"), ("V100", "V100-32GB")):
        if key in name:
            return load_gpu(entry)
    if "A100" in name:
        return load_gpu("A100-80GB" if memory_gib > 50 else "A100-40GB")
    return None


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """The rate of one large square matmul here: three warm-ups, then the fastest of `reps`
    (the fastest, so that a shared CPU's other work does not count)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(reps):
        bench.synchronize(device)
        start = time.perf_counter()
        a @ b
        bench.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def release() -> None:
    """Free what the variant just dropped (its model and optimizer) before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_gib(cfg) -> float:
    """The plan's memory estimate for this one-GPU run, without its fixed allowance (GiB)."""
    from parallelism.topology import Layout
    from training.plan.run_plan import make_plan

    memory = make_plan(cfg, Layout(1, 1, 1))["memory_per_gpu_gib"]
    return memory["total"] - memory["overhead"]


def time_steps(step, batches, steps: int, device: torch.device) -> float:
    """Median seconds per step over `steps` steps, after one warm-up step."""
    step(batches[1])
    seconds = []
    for i in range(steps):
        bench.synchronize(device)
        start = time.perf_counter()
        step(batches[(2 + i) % len(batches)])
        bench.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def model_flops_per_step(cfg) -> float:
    from training.model.shapes import padded_vocab_size
    from training.plan.flops import model_flops_per_iteration

    return model_flops_per_iteration(cfg.model, padded_vocab_size(cfg.model, 1),
                                     cfg.trainer.global_batch_size, cfg.data.seq_length, False)


HF_LABEL = "HF loop (SDPA)"


def run_model(model: str, args, device, overrides, start_time, peak, matmul) -> tuple:
    """(rows, problems) for one model: every framework variant and the HF loop. The HF loop runs
    second (it needs the first variant's initial weights), so a tight time budget still compares."""
    rows, state, reference_cfg, losses, problems, batches = {}, None, None, {}, [], None
    variants = [(k, r) for k in args.kernels for r in args.recompute]
    labels = [f"{k} / {r}" for k, r in variants] + [HF_LABEL]
    for kernels, recompute in variants[:1] + [("hf", None)] + variants[1:]:
        label = f"{kernels} / {recompute}" if recompute else HF_LABEL
        if time.perf_counter() - start_time > args.budget_s:
            rows[label] = {"model": model, "runner": label, "skipped": "time budget"}
            continue
        if recompute is None and state is None:
            rows[label] = {"model": model, "runner": label, "skipped": "no framework weights to start from"}
            continue
        release()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runner = framework = hf = None
        try:
            if recompute is not None:
                framework = bench.build_framework(
                    overrides + [f"model.kernels={kernels}", f"model.recompute={recompute}"], device)
                cfg = framework.cfg
                runner = framework.step
                if state is None:  # the HF loop starts from these weights
                    state, reference_cfg = bench.model_state(framework), cfg
                estimate = plan_gib(cfg)
            else:
                cfg = reference_cfg
                hf = bench.HFLoop(bench.hf_model(state, cfg.model, device, "hf+sdpa"), cfg.optim,
                                  torch.bfloat16 if args.precision == "bf16" else None)
                runner, estimate = hf.step, None
            if batches is None:
                batches = bench.micro_batches(cfg, 4)
            losses[label] = runner(batches[0])
            seconds = time_steps(runner, batches, args.steps, device)
        except Exception as error:  # one variant failing (out of memory, a compile error) ends only its row
            if not isinstance(error, torch.cuda.OutOfMemoryError):
                traceback.print_exc()
            rows[label] = {"model": model, "runner": label,
                           "skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"}
            continue
        finally:
            peak_gib = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
            runner = framework = hf = None
            release()
        tokens = cfg.trainer.global_batch_size * cfg.data.seq_length
        tflops = model_flops_per_step(cfg) / seconds / 1e12
        rows[label] = {"model": model, "runner": label, "tokens_per_s": tokens / seconds, "tflops": tflops,
                       "mfu_peak": tflops / peak if peak else None, "mfu_matmul": tflops / matmul,
                       "memory_gib": peak_gib, "plan_gib": estimate, "loss": losses[label]}
    if losses:  # every runner started from the same weights on the same batch
        first = next(iter(losses.values()))
        try:
            bench.check_equal_losses({"framework": first, **losses}, 2e-2 if args.precision == "bf16" else 1e-5)
        except AssertionError as error:
            problems.append(f"{model}: {error}")
    hf_row = rows.get(HF_LABEL, {})
    for label in labels[:-1]:
        if "tokens_per_s" in rows.get(label, {}) and "tokens_per_s" in hf_row:
            rows[label]["vs_hf"] = rows[label]["tokens_per_s"] / hf_row["tokens_per_s"]
    return [rows[label] for label in labels if label in rows], problems


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows, header: str) -> None:
    print(header)
    columns = (f"{'model':12s} {'runner (kernels / recompute)':30s} {'tokens/s':>10s} {'TFLOPs/GPU':>10s} "
               f"{'MFU peak':>8s} {'MFU mm':>7s} {'vs HF':>6s} {'mem GiB':>8s} {'plan GiB':>8s} {'loss@1':>9s}")
    print(columns)
    print("-" * len(columns))
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:12s} {r['runner']:30s} skipped: {r['skipped']}")
            continue
        print(f"{r['model']:12s} {r['runner']:30s} {r['tokens_per_s']:10.0f} {r['tflops']:10.3g} "
              f"{fmt(r['mfu_peak'], '8.1%'):>8s} {r['mfu_matmul']:7.1%} {fmt(r.get('vs_hf'), '5.2f', ''):>5s}{'x' if r.get('vs_hf') else ' '} "
              f"{fmt(r['memory_gib'], '8.2f'):>8s} {fmt(r['plan_gib'], '8.2f'):>8s} {r['loss']:9.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the reduced CPU version, even with a GPU")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--kernels", nargs="+")
    parser.add_argument("--recompute", nargs="+", default=["none", "selective"])
    parser.add_argument("--seq", type=int)
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no variant after this many seconds (the whole run stays under 8 min)")
    args = parser.parse_args(argv)
    start_time = time.perf_counter()
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu:
        print("gpu_check: no CUDA GPU here: running the reduced CPU version (tiny model, fp32, eager kernels)",
              flush=True)
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.models = args.models or (["bloom-560m", "bloom-1b7"] if gpu else ["bloom-tiny"])
    args.kernels = args.kernels or (["auto", "eager"] if gpu else ["eager"])
    args.seq = args.seq or (2048 if gpu else 64)
    args.micro_batch = args.micro_batch or (4 if gpu else 2)
    args.steps = args.steps or (5 if gpu else 2)
    bench.one_process_job(device)
    if gpu:
        name = torch.cuda.get_device_name(device)
        entry = catalogue_entry(name, torch.cuda.get_device_properties(device).total_memory / GIB)
        peak = entry.peak("bf16") if entry else None
        matmul = measured_matmul_tflops(device, torch.bfloat16, 8192, 20)
        where = (f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}; dense bf16 peak "
                 + (f"{peak:g} TFLOP/s (configs/hardware/{entry.name}.yaml, NVIDIA data sheet)" if peak
                    else "not in the hardware catalogue")
                 + f"; measured bf16 matmul (8192^3) {matmul:.0f} TFLOP/s")
    else:
        name, peak = "CPU", None
        matmul = measured_matmul_tflops(device, torch.float32, 512, 20)
        where = (f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; no catalogue peak; "
                 f"measured fp32 matmul (512^3) {matmul * 1e3:.1f} GFLOP/s")
    rows, problems = [], []
    for model in args.models:
        overrides = [f"model={model}", f"data.seq_length={args.seq}",
                     f"trainer.micro_batch_size={args.micro_batch}",
                     f"trainer.global_batch_size={args.micro_batch}",
                     f"trainer.precision={args.precision}", "parallel.zero_stage=1",
                     "model.hidden_dropout=0", "model.attention_dropout=0"]
        if not gpu:
            overrides += CPU_SHAPE
        model_rows, model_problems = run_model(model, args, device, overrides, start_time, peak, matmul)
        rows, problems = rows + model_rows, problems + model_problems
    header = (f"gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {where}\n"
              f"seq {args.seq}, micro = global batch {args.micro_batch}, {args.precision}, ZeRO-1, one process; "
              f"median of {args.steps} timed steps per row after a warm-up; dropout off; 'vs HF' = tokens/s over the HF loop's")
    print_table(rows, header)
    for problem in problems:
        print(f"gpu_check: error: {problem}", flush=True)
    print(f"gpu_check: done in {time.perf_counter() - start_time:.0f} s", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1" if not torch.cuda.is_available() else "8")
    sys.exit(main())
