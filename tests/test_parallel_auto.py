"""parallel.auto=true: bloom-train (and bloom-slurm, which loads the same config) runs the
planner's winner."""
import json
from pathlib import Path

import yaml

from tests.bloom_train import TINY_RUN, bloom_train, data_cache  # noqa: F401 (fixture)
from training.config.checks import validate
from training.config.loader import ConfigError, load_config
from training.plan.planner import load_planned_config, plan

CLUSTER = ["experiment=bloom-7b1", "launcher.nodes=2", "launcher.gpus_per_node=8", "launcher.gpu_type=A100-40GB"]


def configured(cfg, world: int) -> tuple:
    """The layout a config (without auto) says for `world` processes, read from its fields: (tp,
    pp, dp, micro-batch, recompute, sequence parallel, ZeRO stage); dp is what its TP and PP leave
    of the world (BigScience's own parallel.dp=8, for 128 GPUs, could never equal a 16-GPU winner's)."""
    p = cfg.parallel
    return (p.tp, p.pp, world // (p.tp * p.pp), cfg.trainer.micro_batch_size, cfg.model.recompute,
            p.sequence_parallel, p.zero_stage)


def chosen(lay) -> tuple:
    """The same fields of a planned layout."""
    return (lay.tp, lay.pp, lay.dp, lay.micro_batch, lay.recompute, lay.sequence_parallel, lay.zero_stage)


def test_auto_takes_the_winner():
    winner = plan(load_config(CLUSTER)).ranked[0].layout
    # the winner is not what the config says without auto: taking it changes the run
    assert chosen(winner) != configured(load_config(CLUSTER), 16), "auto would change nothing here"
    cfg = load_planned_config(CLUSTER + ["parallel.auto=true"])
    assert configured(cfg, 16) == chosen(winner)
    assert validate(cfg, 16).world_size == 16
    try:  # BigScience's TP4 x PP4 x DP8 cannot use 16 GPUs: auto is what makes it run
        validate(load_config(CLUSTER), 16)
        raise AssertionError("expected a ConfigError")
    except ConfigError as error:
        assert "parallel.dp=8" in str(error)


def test_bloom_train_runs_the_winner(tmp_path, data_cache):  # noqa: F811
    args = TINY_RUN + ["parallel.auto=true", "launcher.nproc_per_node=2", "trainer.train_iters=2",
                       f"data.cache_dir={data_cache}", f"trainer.run_dir={tmp_path}"]
    winner = plan(load_config(args)).ranked[0].layout
    # auto changes the run: here ZeRO-0 for the config's ZeRO-1 (load_config does not apply auto)
    assert chosen(winner) != configured(load_config(args), 2), "auto would change nothing here"
    run = bloom_train(args)
    assert run.returncode == 0, run.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    p = resolved["parallel"]
    assert (p["tp"], p["pp"], p["dp"], resolved["trainer"]["micro_batch_size"], resolved["model"]["recompute"],
            p["sequence_parallel"], p["zero_stage"]) == chosen(winner)
    steps = [json.loads(line) for line in Path(tmp_path, "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps][-1] == 2
