"""How long a question to the console scripts takes, as a user at a shell waits for it.

    python benchmarks/bench_plan_time.py [--runs 5] [--target 3]

Runs the installed console scripts (the files next to this Python, as the shell would) in fresh
subprocesses, one after another, and prints the wall time of each run and the median:

  plan      bloom-plan model=bloom-7b1 launcher.nodes=2 launcher.gpus_per_node=8 launcher.gpu_type=A100-40GB
            with the planning part it reports ("planned in X s") and its own total ("answered in Y s")
  validate  bloom-train experiment=bloom-7b1 parallel.tp=3 trainer.dry_run=true: a config refused
            by validation (exit status 2, one error line)
  help      <script> --help for every console script in setup.py

and each median's ratio to the target (3 s: issue 20). Nothing is asserted; the machine's other
load shows up in the times, so compare medians from the same run of this script.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = ["bloom-plan", "model=bloom-7b1", "launcher.nodes=2", "launcher.gpus_per_node=8", "launcher.gpu_type=A100-40GB"]
VALIDATE = ["bloom-train", "experiment=bloom-7b1", "parallel.tp=3", "trainer.dry_run=true"]


def console_scripts() -> list:
    block = re.search(r'"console_scripts"\s*:\s*\[(.*?)\]', (ROOT / "setup.py").read_text(), re.S).group(1)
    return sorted(dict(re.findall(r'"([\w-]+)\s*=\s*([\w.]+:\w+)"', block)))


def script_path(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not path:
        sys.exit(f"{name} is not installed next to {sys.executable}: pip install -e .")
    return path


def timed(command: list, expect: int) -> tuple:
    start = time.perf_counter()
    run = subprocess.run([script_path(command[0]), *command[1:]], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if run.returncode != expect:
        sys.exit(f"{' '.join(command)} exited {run.returncode}, expected {expect}:\n{run.stderr[-2000:]}")
    return wall, run.stdout + run.stderr


def seconds(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else float("nan")


def summary(label: str, walls: list, target: float) -> str:
    median = statistics.median(walls)
    return (f"{label:34} median {median:5.2f} s  (min {min(walls):.2f}, max {max(walls):.2f})  "
            f"{median / target:.2f} x the {target:g} s target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--target", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]} at {sys.executable}, {os.cpu_count()} cores, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("$ " + " ".join(PLAN))
    walls, planned, answered = [], [], []
    for index in range(args.runs):
        wall, text = timed(PLAN, 0)
        walls.append(wall)
        planned.append(seconds(r"planned in ([\d.]+) s", text))
        answered.append(seconds(r"answered in ([\d.]+) s", text))
        print(f"  run {index + 1}: wall {wall:.2f} s, planning {planned[-1]:.2f} s, "
              f"bloom-plan's own count {answered[-1]:.1f} s", flush=True)
    lines = [summary("bloom-plan (bloom-7b1, 16 A100-40GB)", walls, args.target)
             + f"; planning median {statistics.median(planned):.2f} s"]
    print("$ " + " ".join(VALIDATE) + "   (refused: exit 2)")
    walls = [timed(VALIDATE, 2)[0] for _ in range(args.runs)]
    print("  " + ", ".join(f"{w:.2f}" for w in walls) + " s", flush=True)
    lines.append(summary("bloom-train, a config refused", walls, args.target))
    for name in console_scripts():
        walls = [timed([name, "--help"], 0)[0] for _ in range(args.runs)]
        print(f"$ {name} --help: " + ", ".join(f"{w:.2f}" for w in walls) + " s", flush=True)
        lines.append(summary(f"{name} --help", walls, args.target))
    print("\n".join(["", f"medians of {args.runs} runs:"] + lines))
    print(f"load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
