"""Who started this process: torchrun, a bare srun task per GPU, or nobody.

torch.distributed's env:// rendezvous reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. torchrun sets them; srun sets SLURM_* instead, so a task srun starts directly has to
translate. The BLOOM launch runs torchrun *inside* srun, so torchrun's variables win.
"""
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, MutableMapping, Optional

from training.config.schema import ConfigError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(ConfigError):
    """An environment no process group can be formed from. A ConfigError so that bloom-train's
    existing handler prints it as one line and exits 2."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" or "slurm": which launcher's variables it came from


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _checked(env: DistEnv) -> DistEnv:
    names = {"torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
             "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")}[env.source]
    rank, size, local = names
    if env.world_size < 1:
        raise LaunchError(f"{size}={env.world_size} must be at least 1")
    if not 0 <= env.rank < env.world_size:
        raise LaunchError(f"{rank}={env.rank} is not in [0, {size}={env.world_size})")
    if not 0 <= env.local_rank <= env.rank:
        raise LaunchError(f"{local}={env.local_rank} is not in [0, {rank}={env.rank}]")
    if not 0 < env.master_port < 65536:
        raise LaunchError(f"MASTER_PORT={env.master_port} is not a TCP port")
    if not env.master_addr:
        raise LaunchError("MASTER_ADDR is empty")
    return env


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    missing = [name for name in TORCHRUN_VARS if name not in environ]
    # LOCAL_RANK is optional for hand-made env:// launches on one node: rank 0's node holds rank 0.
    missing = [name for name in missing if name != "LOCAL_RANK"]
    if missing:
        raise LaunchError(f"{' and '.join(missing)} not set although "
                          f"{'RANK' if 'RANK' in environ else 'WORLD_SIZE'} is: set all of "
                          f"{', '.join(TORCHRUN_VARS)} or none")
    rank = _int(environ, "RANK")
    local_rank = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    return _checked(DistEnv(rank, _int(environ, "WORLD_SIZE"), local_rank, environ["MASTER_ADDR"],
                            _int(environ, "MASTER_PORT"), "torchrun"))


def _split_top_level(text: str) -> List[str]:
    """'a[1-2],b,c[3,5]' -> ['a[1-2]', 'b', 'c[3,5]']: commas inside brackets are ranges."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand_range(spec: str, nodelist: str) -> List[str]:
    """'01-03,07' -> ['01', '02', '03', '07'], keeping zero padding as SLURM does."""
    out = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise LaunchError(f"cannot parse node list {nodelist!r} (range {item!r})")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise LaunchError(f"cannot parse node list {nodelist!r} (range {item!r} runs backwards)")
        out += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return out


def _expand_host(pattern: str, nodelist: str) -> List[str]:
    """'gpu[1-2]-ib[0,1]' -> every combination, as `scontrol show hostnames` prints them."""
    match = re.search(r"\[([^\[\]]*)\]", pattern)
    if not match:
        if "[" in pattern or "]" in pattern:
            raise LaunchError(f"cannot parse node list {nodelist!r} (unbalanced brackets)")
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [head + part + rest for part in _expand_range(match.group(1), nodelist)
            for rest in _expand_host(tail, nodelist)]


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list ('node[01-03,07],login1') as a list of host names."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        hosts += _expand_host(part, nodelist)
    if not hosts:
        raise LaunchError(f"node list {nodelist!r} names no hosts")
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a node list: scontrol's answer where SLURM is installed (it knows every
    syntax its version accepts), else our own expansion."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                    text=True, timeout=30)
            if result.returncode == 0 and result.stdout.split():
                return result.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)[0]


def slurm_port(job_id: str, step_id: str = "0") -> int:
    """A port every task of one step derives alike without talking: from the job and step ids,
    so two jobs sharing a first node rarely collide."""
    try:
        return 20000 + (int(job_id) * 16 + int(step_id)) % 40000
    except ValueError:
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not an integer; set MASTER_PORT") from None


def _from_slurm(environ: Mapping[str, str]) -> Optional[DistEnv]:
    # The step's own counts: a step may use fewer tasks and nodes than the job.
    size_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    if size_name not in environ:
        raise LaunchError("SLURM_PROCID is set but SLURM_NTASKS is not")
    size = _int(environ, size_name)
    if size == 1:
        return None  # one task: nothing to rendezvous with, behave as if started by hand
    nodelist = next((environ[name] for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                                 "SLURM_NODELIST") if environ.get(name)), None)
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    elif nodelist:
        addr = first_host(nodelist)  # block distribution puts task 0 on the first node
    else:
        raise LaunchError("SLURM_NODELIST is not set: cannot tell where task 0 runs; set MASTER_ADDR")
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:
        port = slurm_port(environ["SLURM_JOB_ID"], environ.get("SLURM_STEP_ID", "0"))
    else:
        raise LaunchError("neither MASTER_PORT nor SLURM_JOB_ID is set: cannot pick a port")
    local_rank = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    return _checked(DistEnv(_int(environ, "SLURM_PROCID"), size, local_rank, addr, port, "slurm"))


def distributed_env(environ: Mapping[str, str] = os.environ) -> Optional[DistEnv]:
    """This process's place in the job, or None when no launcher started it (a run by hand)."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    # SLURM_STEP_ID marks a task srun started. The batch script itself also has SLURM_PROCID=0
    # and SLURM_NTASKS=<nodes>, but no other process will ever join it.
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return _from_slurm(environ)
    return None


def export_torch_env(env: DistEnv, environ: MutableMapping[str, str] = os.environ) -> None:
    """Set the variables torch.distributed's env:// rendezvous reads (LOCAL_WORLD_SIZE is not
    needed by it and cannot be known for uneven srun layouts, so it is left alone)."""
    environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                   LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.master_addr,
                   MASTER_PORT=str(env.master_port))
