"""bloom-preprocess --slurm: the corpus in N shards, as a SLURM array job and a merge job after it.

The plan (data/shard_plan.py) and both sbatch scripts are written under OUTPUT_DIR/shards/;
without --submit they are printed with the commands that submit them, as bloom-slurm prints its
script. With --submit the array job is sent first and the merge with `--dependency=afterok` on
it and `--kill-on-invalid-dep=yes`: a shard task that fails (a node lost, a SIGKILL, a bad row
under --strict) cancels the merge instead of leaving it pending. Submitting again with the same
arguments reruns the job: finished shards are kept, missing ones are redone, then the merge.
"""
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from data.errors import DataError
from data.shard_plan import ShardPlan, plan_shards, shards_dir, write_plan

ARRAY_SCRIPT = "preprocess-shards.sbatch"
MERGE_SCRIPT = "preprocess-merge.sbatch"


@dataclass
class SlurmOptions:
    shards: int
    nodes: int | None = None  # at most this many shard tasks at once (array throttle)
    workers: int | None = None  # CPUs per task; None: a whole node per task
    partition: str | None = None
    account: str | None = None
    time: str | None = None


def _directives(job_name: str, opts: SlurmOptions, cpus: int | None, exclusive: bool) -> list[str]:
    lines = [f"--job-name={job_name}", "--nodes=1", "--ntasks=1"]
    lines.append("--exclusive" if exclusive else f"--cpus-per-task={cpus or 1}")
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("time", opts.time)):
        if value:
            lines.append(f"--{flag}={value}")
    return [f"#SBATCH {line}" for line in lines]


def array_script(out: Path, opts: SlurmOptions, count: int, python: str, command: str) -> str:
    logs = shards_dir(out) / "logs"
    throttle = f"%{opts.nodes}" if opts.nodes else ""
    lines = ["#!/bin/bash",
             "# bloom-preprocess shard tasks, one per shard of plan.json; rendered by:",
             f"#   {command}",
             *_directives("bloom-preprocess", opts, opts.workers, exclusive=opts.workers is None),
             f"#SBATCH --array=0-{count - 1}{throttle}",
             f"#SBATCH --output={logs}/%x-%A_%a.out",
             "set -euo pipefail",
             "# A task writes its shard aside and renames it when complete: killed, it leaves nothing the",
             "# merge reads; started again, it keeps a finished shard.",
             f"exec {shlex.quote(python)} -m data.shard_task {shlex.quote(str(out))} \"$SLURM_ARRAY_TASK_ID\" \\",
             '    --workers "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"', ""]
    return "\n".join(lines)


def merge_script(out: Path, opts: SlurmOptions, python: str, command: str) -> str:
    logs = shards_dir(out) / "logs"
    lines = ["#!/bin/bash",
             "# bloom-preprocess merge: every shard, in shard order, into one .bin/.idx per language; by:",
             f"#   {command}",
             *_directives("bloom-preprocess-merge", opts, 1, exclusive=False),
             f"#SBATCH --output={logs}/%x-%j.out",
             "set -euo pipefail",
             f"exec {shlex.quote(python)} -m data.shard_merge {shlex.quote(str(out))}", ""]
    return "\n".join(lines)


def write_job(plan: ShardPlan, out: Path, opts: SlurmOptions, command: str) -> tuple[Path, Path]:
    """The plan and both scripts under OUTPUT_DIR/shards; their paths."""
    write_plan(out, plan)
    directory = shards_dir(out)
    # SLURM opens --output before the script runs and does not create its directory.
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    paths = directory / ARRAY_SCRIPT, directory / MERGE_SCRIPT
    python = sys.executable
    for path, text in zip(paths, (array_script(out, opts, plan.count, python, command),
                                  merge_script(out, opts, python, command))):
        path.write_text(text)
        path.chmod(0o755)
    return paths


def sbatch(script: Path, *options: str) -> str:
    """The job id sbatch gives the script; its refusal in one line."""
    command = shutil.which("sbatch")
    if not command:
        raise DataError("sbatch not found on PATH: --submit needs a SLURM client")
    result = subprocess.run([command, "--parsable", *options, str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["no message"]
        raise RuntimeError(f"sbatch {script} failed: {lines[-1].strip()}")
    return result.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"


def run(sources: list, tokenizer: str, plan_options: dict, out: str | Path, opts: SlurmOptions,
        submit: bool, command: str) -> dict:
    """Plan, write and (with submit) send the job; what was done, for the CLI to print."""
    out = Path(out).resolve()
    plan = ShardPlan(plan_shards(sources, opts.shards), str(Path(tokenizer).resolve()), plan_options)
    array_path, merge_path = write_job(plan, out, opts, command)
    result = {"plan": str(shards_dir(out) / "plan.json"), "array_script": str(array_path),
              "merge_script": str(merge_path), "shards": plan.count}
    if submit:
        array_id = sbatch(array_path)
        merge_id = sbatch(merge_path, f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes")
        result.update(array_job=array_id, merge_job=merge_id)
    return result


def describe(result: dict) -> str:
    """Without --submit: both scripts and how to submit them."""
    array_path, merge_path = result["array_script"], result["merge_script"]
    return "\n".join([Path(array_path).read_text(), Path(merge_path).read_text(),
                      "# submit both (the merge after every shard task):",
                      f"#   jobid=$(sbatch --parsable {array_path})",
                      f"#   sbatch --dependency=afterok:$jobid --kill-on-invalid-dep=yes {merge_path}", ""])


def add_arguments(parser) -> None:
    """bloom-preprocess's SLURM options."""
    group = parser.add_argument_group(
        "SLURM (the corpus in shards, as an array job over many nodes, and a merge job after it)")
    group.add_argument("--slurm", action="store_true",
                       help="write the plan and both job scripts under OUTPUT_DIR/shards and print them "
                            "(needs --tokenizer and --shards); --submit submits them")
    group.add_argument("--shards", type=int, metavar="N",
                       help="array tasks: the inputs cut at file or Parquet row-group boundaries, "
                            "balanced by bytes; the merged output does not depend on N")
    group.add_argument("--nodes", type=int, metavar="K", help="at most K shard tasks at once (default: no limit)")
    group.add_argument("--partition", help="SLURM partition of both jobs")
    group.add_argument("--account", help="SLURM account of both jobs")
    group.add_argument("--time", help="time limit of each task and of the merge (HH:MM:SS)")
    group.add_argument("--submit", action="store_true",
                       help="sbatch the array job, then the merge after it (afterok); again with the same "
                            "arguments, it redoes only the shards not finished")


def checked_options(args) -> SlurmOptions:
    """The SLURM options, refused in one line where they cannot make a job."""
    if args.tokenizer is None:
        raise DataError("--slurm needs --tokenizer: train one first (--train-tokenizer-vocab without --slurm)")
    if args.shards is None:
        raise DataError("--slurm needs --shards N (the array job's tasks)")
    for flag in ("shards", "nodes", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise DataError(f"--{flag} must be >= 1, got {value}")
    return SlurmOptions(shards=args.shards, nodes=args.nodes, workers=args.workers, partition=args.partition,
                        account=args.account, time=args.time)


def refuse_without_slurm(args) -> None:
    """A SLURM option given without --slurm is a mistake worth one line, not a silent local run."""
    given = [flag for flag in ("shards", "nodes", "partition", "account", "time") if getattr(args, flag) is not None]
    if args.submit:
        given.append("submit")
    if given:
        raise DataError(f"--{given[0]} is an option of --slurm: add --slurm, or leave it out for a one-machine run")
