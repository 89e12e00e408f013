"""launch/env.py: which launcher started a process, read from its environment variables."""
import shutil
import subprocess

import pytest

from launch.env import (DistEnv, LaunchError, distributed_env, expand_nodelist, export_torch_env,
                        first_host)

TORCHRUN = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node07", MASTER_PORT="6000")
# What srun gives the second task of `srun -N 2 -n 4` inside job 4242 (values as SLURM 22.05 sets them).
SRUN_TASK = dict(SLURM_PROCID="2", SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4", SLURM_LOCALID="0",
                 SLURM_STEP_ID="0", SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[07-08]",
                 SLURM_JOB_NODELIST="gpu[07-08,11]", SLURM_NODELIST="gpu[07-08,11]")


def test_no_launcher_means_none():
    assert distributed_env({"PATH": "/usr/bin", "HOME": "/root"}) is None


def test_torchrun_variables():
    assert distributed_env(TORCHRUN) == DistEnv(3, 8, 1, "node07", 6000, "torchrun")


def test_srun_task_variables():
    env = distributed_env(SRUN_TASK)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (2, 4, 0, "slurm")
    assert env.master_addr == "gpu07"  # the step's first node, where task 0 runs


def test_srun_port_is_the_same_for_every_task_and_differs_between_jobs():
    ports = {distributed_env({**SRUN_TASK, "SLURM_PROCID": str(r)}).master_port for r in range(4)}
    assert len(ports) == 1 and 1024 < ports.pop() < 65536
    assert (distributed_env(SRUN_TASK).master_port
            != distributed_env({**SRUN_TASK, "SLURM_JOB_ID": "4243"}).master_port)


def test_explicit_master_addr_and_port_win_under_srun():
    env = distributed_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "7777"})
    assert (env.master_addr, env.master_port) == ("10.0.0.5", 7777)


def test_torchrun_inside_srun_wins():
    """BLOOM's launch: srun starts one torchrun per node; the workers see both sets of variables."""
    assert distributed_env({**SRUN_TASK, **TORCHRUN}) == distributed_env(TORCHRUN)


def test_batch_script_and_single_task_are_not_a_launch():
    # The batch shell has SLURM_PROCID=0 and the job's task count, but no step: nobody will join.
    batch_shell = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")}
    assert distributed_env({**batch_shell, "SLURM_PROCID": "0"}) is None
    assert distributed_env({**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) is None


@pytest.mark.parametrize("environ, message", [
    ({**TORCHRUN, "RANK": "8"}, "RANK=8 is not in [0, WORLD_SIZE=8)"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({**TORCHRUN, "LOCAL_RANK": "5"}, "LOCAL_RANK=5 is not in [0, RANK=3]"),
    ({**TORCHRUN, "RANK": "three"}, "RANK='three' is not an integer"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "MASTER_ADDR not set although RANK is"),
    ({"WORLD_SIZE": "2"}, "RANK and MASTER_ADDR and MASTER_PORT not set although WORLD_SIZE is"),
    ({**SRUN_TASK, "SLURM_PROCID": "4"}, "SLURM_PROCID=4 is not in [0, SLURM_NTASKS=4)"),
    ({k: v for k, v in SRUN_TASK.items() if "NODELIST" not in k}, "SLURM_NODELIST is not set"),
])
def test_inconsistent_environment_is_one_line(environ, message):
    with pytest.raises(LaunchError) as error:
        distributed_env(environ)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("jean-zay-iam[01-02],login1", ["jean-zay-iam01", "jean-zay-iam02", "login1"]),
    ("a[1-2]-ib[0,3]", ["a1-ib0", "a1-ib3", "a2-ib0", "a2-ib3"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    if shutil.which("scontrol"):  # the same answer as SLURM's own expansion
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True).stdout.split()
        assert out == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist", ["node[01-03", "node[a-b]", "node[5-3]", ","])
def test_bad_nodelist_is_one_line(nodelist):
    with pytest.raises(LaunchError, match="node list"):
        expand_nodelist(nodelist)


def test_export_torch_env_sets_what_env_init_reads():
    environ = {"SLURM_PROCID": "1"}
    export_torch_env(DistEnv(1, 2, 1, "gpu07", 21234, "slurm"), environ)
    assert environ == {"SLURM_PROCID": "1", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                       "MASTER_ADDR": "gpu07", "MASTER_PORT": "21234"}
    assert distributed_env(environ).source == "torchrun"  # a second look agrees with the first
