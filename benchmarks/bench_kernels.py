"""Speed of each kernel backend against eager, side by side in one run, on this machine's device.

    python benchmarks/bench_kernels.py [--hidden 512] [--layers 4] [--heads 8] [--seq 1024]
                                       [--batch 4] [--dtype fp32|bf16] [--rounds 5] [--device cpu|cuda]

The same BLOOM (same weights, dropout off) runs with each backend present (`model.kernels`):
a training step (forward, loss, backward) and an evaluation forward, timed in interleaved rounds
(eager, torch, flex, eager, torch, ...) so that load on a shared machine hits every backend alike;
the best round of each counts. Printed: seconds per step and the ratio eager / backend (above 1:
faster than eager). The backends' losses are printed too: they compute the same function.
FlexAttention has no backward on CPU (torch 2.13), so there it is timed for evaluation only.
Nothing is asserted: it prints numbers.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallelism.topology import Layout, init_model_parallel, shutdown  # noqa: E402
from training.config.schema import ModelConfig  # noqa: E402
from training.model.kernels import KernelUnavailable, available_backends, select_kernels  # noqa: E402
from training.model.bloom import build_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def one_process_group() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    init_model_parallel(Layout(1, 1, 1))


def model_with(kernels: str, args, device, dtype):
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      vocab_size=args.vocab, kernels=kernels, hidden_dropout=0.0,
                      attention_dropout=0.0)
    return build_model(cfg, seed=1, device=device).to(dtype)


def train_step(model, tokens, labels) -> float:
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels)
    loss.backward()
    return loss.item()


@torch.no_grad()
def eval_step(model, tokens, labels) -> float:
    return model(tokens, labels).item()


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def runnable(backend: str, device, mode: str) -> bool:
    return not (backend == "flex" and device.type == "cpu" and mode == "train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    one_process_group()
    backends = available_backends(device)
    models = {}
    for name in backends:
        try:
            models[name] = model_with(name, args, device, dtype)
        except KernelUnavailable as error:
            print(f"{name}: skipped ({error})")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
    steps = {"train": train_step, "eval": eval_step}
    print(f"device {device} ({torch.get_num_threads()} threads), {args.dtype}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.heads} heads, batch {args.batch} x seq {args.seq}, "
          f"best of {args.rounds} interleaved rounds")
    losses, best = {}, {}
    for (mode, step), name in ((m, n) for m in steps.items() for n in models):
        if runnable(name, device, mode):  # warm-up: compiles, allocator, caches
            losses[(mode, name)] = step(models[name], tokens, labels)
    for _ in range(args.rounds):
        for mode, step in steps.items():
            for name, model in models.items():
                if runnable(name, device, mode):
                    seconds = timed(lambda: step(model, tokens, labels), device)
                    best[(mode, name)] = min(best.get((mode, name), seconds), seconds)
    for mode in steps:
        eager = best[(mode, "eager")]
        for name in models:
            if (mode, name) not in best:
                print(f"{mode:5s} {name:6s}  not timed (no backward on {device.type})")
                continue
            seconds = best[(mode, name)]
            print(f"{mode:5s} {name:6s}  {seconds * 1e3:9.1f} ms   eager/{name} = {eager / seconds:5.2f}"
                  f"   loss {losses[(mode, name)]:.6f}")
    shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    main()
