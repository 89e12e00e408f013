"""bloom-slurm: render (and optionally submit) the sbatch script for a bloom-train run.

usage: bloom-slurm [GROUP=OPTION ...] [KEY=VALUE ...] [--submit] [--out FILE] [--cpus-per-task N]
                   [--exclusive] [--port PORT] [--step-wait SECONDS]

  overrides            bloom-train's Hydra overrides (bloom-train --help lists them); the job is
                       launcher.nodes x launcher.gpus_per_node in launcher.partition and
                       launcher.account for launcher.time
  (no --out, --submit) print the script on stdout
  --out FILE           write the script to FILE
  --submit             write it to trainer.run_dir/bloom-slurm.sbatch and sbatch it; prints the job id
  --cpus-per-task N    CPUs per node's task (default: 8 per GPU)
  --exclusive          whole nodes (#SBATCH --exclusive)
  --port PORT          the rendezvous port (default 6000)
  --step-wait SECONDS  how long srun waits for the other nodes once one node's torchrun has exited
                       (srun --wait, 60 s as BigScience ran): with a node lost, its task never
                       reports, so this is part of how long a failed job takes to end

The layout is checked first (world size = launcher.nodes x processes per node), so a config that
cannot be laid out is refused here, not after hours in the queue.

Examples:
  bloom-slurm experiment=bloom-176b launcher.partition=gpu launcher.account=ajs
  bloom-slurm experiment=bloom-7b1 trainer.run_dir=runs/bloom-7b1 --submit
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

# megatron-core (imported by the config checks) warns when NVIDIA's optional fused packages are
# absent, as on any machine that only submits jobs; that would bury bloom-slurm's own output.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from launch.heap import freeze_heap_at_exit
from launch.slurm_template import TEMPLATE
from training.config.checks import procs_per_node, validate
from training.config.schema import ConfigError, RootConfig

RDZV_PORT = 6000  # BigScience's tr11 rendezvous port
PRE_TIMEOUT_SECONDS = 120  # SIGUSR1 this long before the time limit: time to save and exit
SHUTDOWN_SECONDS = 100  # how long torchrun lets workers finish saving after a signal
STEP_WAIT_SECONDS = 60  # srun --wait: tr11's; after it, srun ends the tasks still running
CPUS_PER_GPU = 8  # tr11-176B asked 64 CPUs for 8 GPUs (data loader workers, pinned memory)
SCRIPT_NAME = "bloom-slurm.sbatch"


class Usage(argparse.ArgumentParser):
    """argparse, but its errors are one line in bloom-slurm's format, not usage plus message."""

    def error(self, message):
        raise ConfigError(message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = Usage(prog="bloom-slurm", add_help=False)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--submit", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--exclusive", action="store_true")
    parser.add_argument("--port", type=int, default=RDZV_PORT)
    parser.add_argument("--step-wait", type=int, default=STEP_WAIT_SECONDS)
    # Intermixed: `bloom-slurm experiment=x --submit trainer.y=1` reads naturally.
    args = parser.parse_intermixed_args(list(argv))
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task={args.cpus_per_task} must be at least 1")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port={args.port} is not a TCP port")
    if args.step_wait < 1:
        raise ConfigError(f"--step-wait={args.step_wait} must be at least 1 second")
    return args


def checked_config(overrides: Sequence[str]) -> RootConfig:
    """The config, validated for the world size this job will have."""
    from training.plan.planner import load_planned_config  # Hydra: not for --help

    cfg = load_planned_config(overrides)
    launcher = cfg.launcher
    if launcher.gpus_per_node < 0:
        raise ConfigError(f"launcher.gpus_per_node={launcher.gpus_per_node} must not be negative")
    if launcher.nproc_per_node is not None and launcher.nproc_per_node < 1:
        raise ConfigError(f"launcher.nproc_per_node={launcher.nproc_per_node} must be at least 1")
    if launcher.nodes < 1:
        raise ConfigError(f"launcher.nodes={launcher.nodes} must be at least 1")
    validate(cfg, launcher.nodes * procs_per_node(cfg))
    return cfg


def sbatch_directives(cfg: RootConfig, *, run_dir: Path, cpus_per_task: Optional[int] = None,
                      exclusive: bool = False) -> List[str]:
    launcher, gpus = cfg.launcher, cfg.launcher.gpus_per_node
    default_cpus = CPUS_PER_GPU * gpus if gpus else procs_per_node(cfg)
    logs = run_dir / "logs"
    lines = [f"--job-name={cfg.model.name}",
             f"--nodes={launcher.nodes}",
             "--ntasks-per-node=1",  # torchrun starts the node's processes, not srun
             f"--cpus-per-task={cpus_per_task or default_cpus}"]
    if gpus:
        lines.append(f"--gres=gpu:{gpus}")
    lines.append(f"--time={launcher.time}")
    if launcher.partition:
        lines.append(f"--partition={launcher.partition}")
    if launcher.account:
        lines.append(f"--account={launcher.account}")
    if exclusive:
        lines.append("--exclusive")
    lines += [f"--output={logs}/%x-%j.out", f"--error={logs}/%x-%j.err",
              "--open-mode=append",  # a requeued job adds to its logs instead of truncating them
              f"--signal=USR1@{PRE_TIMEOUT_SECONDS}",
              "--requeue"]
    return [f"#SBATCH {line}" for line in lines]


def render_script(cfg: RootConfig, overrides: Sequence[str], *, workdir: str, python: str,
                  cpus_per_task: Optional[int] = None, exclusive: bool = False,
                  port: int = RDZV_PORT, step_wait: int = STEP_WAIT_SECONDS) -> str:
    run_dir = Path(workdir, cfg.trainer.run_dir).resolve()
    quoted = " ".join(shlex.quote(arg) for arg in overrides)
    fields = {
        "SBATCH": "\n".join(sbatch_directives(cfg, run_dir=run_dir, cpus_per_task=cpus_per_task,
                                              exclusive=exclusive)),
        "WORKDIR": shlex.quote(str(workdir)),
        "PORT": str(port),
        "PYTHON": shlex.quote(python),
        "RANK_LOGS": shlex.quote(str(run_dir / "logs")),
        "RUN_DIR": shlex.quote(str(run_dir)),
        "NPROC": str(procs_per_node(cfg)),
        "SHUTDOWN": str(SHUTDOWN_SECONDS),
        "STEP_WAIT": str(step_wait),
        "OVERRIDES": quoted.replace("\n", " "),
    }
    script = TEMPLATE
    for name, value in fields.items():
        script = script.replace(f"@{name}@", value)
    return script


def submit(script_path: Path) -> str:
    """sbatch the script and return the job id; sbatch's refusal becomes a one-line RuntimeError."""
    sbatch = shutil.which("sbatch")
    if not sbatch:
        raise ConfigError("sbatch not found on PATH: --submit needs a SLURM client")
    result = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["no message"]
        raise RuntimeError(f"sbatch {script_path} failed: {lines[-1].strip()}")
    return result.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"


def write_script(script: str, path: Path, run_dir: Path) -> Path:
    # SLURM opens --output before the script runs and does not create its directory.
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    freeze_heap_at_exit()  # launch/heap.py: no heap walk at exit
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        args = parse_args(argv)
        cfg = checked_config(args.overrides)
        workdir = os.getcwd()
        script = render_script(cfg, args.overrides, workdir=workdir, python=sys.executable,
                               cpus_per_task=args.cpus_per_task, exclusive=args.exclusive,
                               port=args.port, step_wait=args.step_wait)
        run_dir = Path(workdir, cfg.trainer.run_dir).resolve()
        if not (args.out or args.submit):
            print(script, end="")
            return 0
        path = write_script(script, Path(args.out) if args.out else run_dir / SCRIPT_NAME, run_dir)
        if not args.submit:
            print(f"bloom-slurm: wrote {path}", file=sys.stderr)
            return 0
        job_id = submit(path)
    except ConfigError as error:
        print(f"bloom-slurm: error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as error:
        print(f"bloom-slurm: error: {error}", file=sys.stderr)
        return 1
    print(f"bloom-slurm: submitted {path}; logs in {run_dir / 'logs'}", file=sys.stderr)
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
