"""Time to the first step of `bloom-train` as a user on a fresh machine sees it.

    python benchmarks/bench_startup.py [--warm] [--runs 1] [overrides...]

Starts `python -m launch.train_cli` (what the `bloom-train` console script runs) with empty torch
extension and inductor caches (a fresh TORCH_EXTENSIONS_DIR and TORCHINDUCTOR_CACHE_DIR per run,
so the shared caches of this machine are neither used nor deleted; --warm keeps one pair of
directories across runs, the second start of a machine) and a scratch run directory, timestamps
every output line against the process start, and stops the run once the first step's line
("iter 1/...") is printed. The data cache (tokenizer + tokenized corpus) is the project's
usual one: a first-ever run spends ~30 s more there.

Printed per run: seconds to each phase line and to the first step. Nothing is asserted.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_STEP = "iter 1/"


def one_run(overrides, cache_root: str) -> dict:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(cache_root, "torch_extensions"),
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_root, "inductor"), "PYTHONUNBUFFERED": "1"}
    run_dir = tempfile.mkdtemp(prefix="bench_startup_run_")
    command = [sys.executable, "-m", "launch.train_cli", f"trainer.run_dir={run_dir}", *overrides]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, first_step = [], None
    for line in proc.stdout:
        elapsed = time.perf_counter() - start
        lines.append((elapsed, line.rstrip()))
        if FIRST_STEP in line:
            first_step = elapsed
            os.killpg(proc.pid, signal.SIGTERM)
            break
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"first_step": first_step, "lines": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--warm", action="store_true", help="keep the caches between runs")
    parser.add_argument("--verbose", action="store_true", help="print every timestamped line")
    args, overrides = parser.parse_known_args()
    shared = tempfile.mkdtemp(prefix="bench_startup_cache_")
    for index in range(args.runs):
        cache = shared if args.warm else tempfile.mkdtemp(prefix="bench_startup_cache_")
        result = one_run(overrides, cache)
        for elapsed, line in result["lines"]:
            if args.verbose or FIRST_STEP in line or "built successfully" in line or "training " in line:
                print(f"  {elapsed:7.1f} s  {line[:140]}")
        first = result["first_step"]
        print(f"run {index + 1}: first logged step after "
              + (f"{first:.1f} s" if first is not None else "never (the run ended without one)"), flush=True)


if __name__ == "__main__":
    main()
