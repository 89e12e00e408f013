"""bloom-slurm's rendered sbatch script and its refusals (no SLURM needed)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.slurm import checked_config, render_script
from training.config.loader import ConfigError

REPO = Path(__file__).resolve().parent.parent


def bloom_slurm(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bloom_176b():
    overrides = ["experiment=bloom-176b", "launcher.partition=gpu_p5", "launcher.account=six@a100"]
    cfg = checked_config(overrides)
    return render_script(cfg, overrides, workdir="/scratch/bloom", python="/opt/venv/bin/python")


def directives(script):
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_176b_allocation_is_48_nodes_of_8_gpus(bloom_176b):
    assert directives(bloom_176b) == [
        "--job-name=bloom-176b", "--nodes=48", "--ntasks-per-node=1", "--cpus-per-task=64",
        "--gres=gpu:8", "--time=20:00:00", "--partition=gpu_p5", "--account=six@a100",
        "--output=/scratch/bloom/runs/bloom-176b/logs/%x-%j.out",
        "--error=/scratch/bloom/runs/bloom-176b/logs/%x-%j.err",
        "--open-mode=append", "--signal=USR1@120", "--requeue"]


def test_176b_runs_torchrun_per_node_under_srun(bloom_176b):
    launch = bloom_176b[bloom_176b.index("\nsrun ") + 1:].replace("\\\n", " ")
    launch = " ".join(launch.split())
    assert launch.startswith("srun --wait=60 --kill-on-bad-exit=1 bash -c 'exec \"$PYTHON\" -u -m "
                             "torch.distributed.run --nproc_per_node 8 --nnodes \"$SLURM_NNODES\" "
                             "--node_rank \"$SLURM_PROCID\" --rdzv_backend c10d "
                             "--rdzv_endpoint \"$MASTER_ADDR:$MASTER_PORT\"")
    assert "--max_restarts 0 --tee 3" in launch
    assert "SIGUSR1" in launch.split("--signals-to-handle")[1].split()[0]
    assert ("-m launch.train_cli \"$@\"' bloom-train experiment=bloom-176b "
            "launcher.partition=gpu_p5 launcher.account=six@a100 && status=0 || status=$?") in launch
    # after the step: requeue when the run's exit record asks for it (tests/test_exit_record.py),
    # without the hosts whose ranks went silent (tests/test_node_faults.py)
    assert launch.endswith('-m training.exit_record /scratch/bloom/runs/bloom-176b "$SLURM_JOB_ID"; '
                           'then requeue_without "$("$PYTHON" -m training.exit_record --exclude '
                           '/scratch/bloom/runs/bloom-176b)" fi exit $status')
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in bloom_176b
    assert "MASTER_PORT=${MASTER_PORT:-6000}" in bloom_176b
    assert "PYTHON=/opt/venv/bin/python" in bloom_176b and "cd /scratch/bloom" in bloom_176b


def test_script_is_valid_bash_with_nothing_left_unfilled(bloom_176b, tmp_path):
    assert not re.search(r"@[A-Z_]+@", bloom_176b)
    path = tmp_path / "job.sbatch"
    path.write_text(bloom_176b)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_cpu_job_asks_no_gpus_and_one_cpu_per_process():
    cfg = checked_config(["launcher.nproc_per_node=2"])
    lines = directives(render_script(cfg, [], workdir="/w", python="python"))
    assert not any(line.startswith("--gres") for line in lines)
    assert "--cpus-per-task=2" in lines and "--nodes=1" in lines


def test_options_exclusive_and_cpus(tmp_path):
    cfg = checked_config(["experiment=bloom-176b"])
    script = render_script(cfg, [], workdir="/w", python="python", cpus_per_task=32,
                           exclusive=True, port=6123, step_wait=15)
    assert {"--exclusive", "--cpus-per-task=32"} <= set(directives(script))
    assert "MASTER_PORT=${MASTER_PORT:-6123}" in script
    assert "\nsrun --wait=15 --kill-on-bad-exit=1 " in script


def test_overrides_are_shell_quoted():
    override = "trainer.run_dir=/tmp/it's here"
    cfg = checked_config([])
    script = render_script(cfg, [override], workdir="/w", python="python")
    assert "bloom-train 'trainer.run_dir=/tmp/it'\"'\"'s here'" in script


def test_bad_layout_is_refused_before_anything_is_written(tmp_path):
    """The real command in a fresh process: one line on stderr, nothing else, nothing written."""
    result = bloom_slurm("experiment=bloom-176b", "parallel.pp=5", "--out", "job.sbatch", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "bloom-slurm: error: world size 384 is not a multiple of parallel.tp x parallel.pp = 4 x 5"]
    assert not list(tmp_path.iterdir())


def test_layout_disagreeing_with_the_nodes_is_refused():
    with pytest.raises(ConfigError, match="parallel.dp=8 disagrees with world size 192"):
        checked_config(["experiment=bloom-176b", "launcher.nodes=24"])


@pytest.mark.parametrize("args, message", [
    (["--cpus-per-task", "0"], "--cpus-per-task=0 must be at least 1"),
    (["--step-wait", "0"], "--step-wait=0 must be at least 1 second"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["launcher.nodes=0"], "launcher.nodes=0 must be at least 1"),
    (["no_such_group=x"], "no_such_group"),
])
def test_usage_errors_are_one_line(args, message, capsys):
    from launch.slurm import main

    status = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("bloom-slurm: error: ")
    assert message in lines[0]


def test_out_writes_the_script_and_makes_the_log_directory(tmp_path, monkeypatch):
    from launch.slurm import main

    monkeypatch.chdir(tmp_path)
    assert main(["launcher.nproc_per_node=2", "trainer.run_dir=run", "--out", "job.sbatch"]) == 0
    assert "--cpus-per-task=2" in (tmp_path / "job.sbatch").read_text()
    assert (tmp_path / "run" / "logs").is_dir()  # SLURM will not create it for --output
