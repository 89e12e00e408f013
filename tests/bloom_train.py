"""Run the real `bloom-train` console entry in a subprocess, as a user would, on a tiny model.

The shipped corpus is preprocessed once per test session into a shared cache (tokenizer training
included), so each run starts from prepared data.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TINY_RUN = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "data.seq_length=32",
            "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "logging.log_interval=1",
            "trainer.eval_interval=1000", "logging.tensorboard=false", "optim.warmup_samples=8"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """The demo corpus, tokenized once for the whole session."""
    from data.config import DataConfig
    from data.prepare import prepare_data
    from data.distributed import ensure_process_group

    cache = tmp_path_factory.mktemp("data_cache")
    ensure_process_group()
    prepare_data(DataConfig(cache_dir=str(cache)))
    return str(cache)


def bloom_train(args, env=None, kill_when=None, timeout=300) -> subprocess.CompletedProcess:
    """bloom-train with these overrides; with kill_when, SIGKILL the whole process group as soon
    as a line of its output contains that text (a crash at a chosen point)."""
    command = [sys.executable, "-m", "launch.train_cli", *args]
    full_env = {**os.environ, **(env or {})}
    if kill_when is None:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if kill_when in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(command, proc.returncode, "".join(lines), "")


def step_losses(run_dir) -> dict:
    """{step: lm_loss} from a run's metrics.jsonl."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "lm_loss" in record:
            out[record["step"]] = (record["lm_loss"], record["consumed_samples"])
    return out


def run_trainer(overrides: list):
    """The Trainer `bloom-train` runs, in this process of a job (tests/multiprocess.py): for tests
    that look inside the running model afterwards, or start several runs in one launch."""
    import torch.distributed as dist

    from training.config.checks import validate
    from training.config.loader import load_config
    from training.trainer import Trainer

    cfg = load_config(overrides)
    trainer = Trainer(cfg, validate(cfg, dist.get_world_size(), trains_here=True))
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer
