"""A 4-rank bloom-train launch with launch/heap.py's collector policy against CPython's defaults.

    python benchmarks/bench_heap.py [--pairs 3] [--iters 30] [--ranks 4]

Both sides are the same command, `python -m launch.train_cli` with the tiny model, TP 2 x DP 2,
dropout 0.1, bf16 where the CPU has it, on the shipped corpus (prepared once, first). The baseline's
ranks run a copy of the entry with the policy taken out (main undecorated, start_collecting a
no-op): the imports collect as CPython decides, and the interpreter walks its heap at exit. The
pairs alternate which side goes first; both are started under torchrun as bloom-train's local
launcher starts them. Prints each launch's wall time and CPU seconds (torchrun and the ranks),
the medians and the ratios.
Nothing is asserted.
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The baseline rank: bloom-train's own main with the policy removed.
BASELINE_ENTRY = """
import sys
import launch.train_cli as cli
cli.start_collecting = lambda: None
sys.exit(cli.main.__wrapped__(sys.argv[1:]))
"""


def overrides(run_dir: Path, cache: str, iters: int, ranks: int) -> list:
    from parallelism.precision_support import unsupported_reason

    precision = "bf16" if unsupported_reason("bf16") is None else "fp32"
    return ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "data.seq_length=32",
            "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "logging.log_interval=1",
            "trainer.eval_interval=1000", "logging.tensorboard=false", "optim.warmup_samples=8",
            "model.hidden_dropout=0.1", "model.attention_dropout=0.1", "model.kernels=eager",
            "parallel.tp=2", f"launcher.nproc_per_node={ranks}", f"trainer.precision={precision}",
            f"trainer.train_iters={iters}", "trainer.save_interval=1000", f"trainer.run_dir={run_dir}",
            f"data.cache_dir={cache}"]


def launch(args: list, ranks: int, baseline: bool, scratch: Path) -> tuple:
    """(wall s, CPU s of the process tree) of one launch under torchrun; exits if it fails."""
    from launch.local import torchrun_command

    entry = "launch.train_cli"
    if baseline:
        entry = str(scratch / "baseline_rank.py")
        Path(entry).write_text(BASELINE_ENTRY)
    command = torchrun_command(ranks, args, entry=entry, log_dir=str(scratch / "logs"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"launch failed ({'baseline' if baseline else 'policy'}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--ranks", type=int, default=4)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-heap-"))
    try:
        from data.config import DataConfig
        from data.distributed import ensure_process_group
        from data.prepare import prepare_data

        cache = str(scratch / "data_cache")
        ensure_process_group()
        prepare_data(DataConfig(cache_dir=cache))
        times = {"policy": [], "baseline": []}
        for pair in range(args.pairs):
            order = ["policy", "baseline"] if pair % 2 == 0 else ["baseline", "policy"]
            for side in order:
                run_dir = scratch / f"run-{side}-{pair}"
                wall, cpu = launch(overrides(run_dir, cache, args.iters, args.ranks), args.ranks,
                                   side == "baseline", scratch)
                shutil.rmtree(run_dir, ignore_errors=True)
                times[side].append((wall, cpu))
                print(f"pair {pair + 1} {side:8s}: wall {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)
        medians = {side: tuple(statistics.median(t[i] for t in runs) for i in (0, 1)) for side, runs in times.items()}
        (bw, bc), (pw, pc) = medians["baseline"], medians["policy"]
        print(f"medians: baseline wall {bw:.2f} s cpu {bc:.2f} s | policy wall {pw:.2f} s cpu {pc:.2f} s | "
              f"baseline / policy: wall {bw / pw:.2f}x, cpu {bc / pc:.2f}x")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
