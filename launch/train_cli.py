"""bloom-train: validate the config, then plan (dry run) or train.

    bloom-train [hydra overrides...]     e.g. experiment=bloom-176b trainer.dry_run=true

Started by hand with launcher.nproc_per_node=N > 1 it starts N local processes with torchrun;
under torchrun or srun it joins the job it finds in the environment.
"""
import os
import sys
import warnings

# megatron-core warns on import when NVIDIA's optional fused packages are absent; that is expected
# on CPU and would bury the one line a user needs to read.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
# Likewise DeepSpeed warns on import that it found no GPU and uses its CPU accelerator: on a machine
# without CUDA that is the plan, not news. Naming the accelerator keeps its console quiet.
if "DS_ACCELERATOR" not in os.environ:
    import torch  # noqa: E402

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from data.errors import DataError  # noqa: E402
from launch.env import distributed_env, export_torch_env  # noqa: E402
from launch.local import relaunch_with_torchrun  # noqa: E402
from training.checkpoint.files import CheckpointError  # noqa: E402
from training.config.schema import ConfigError  # noqa: E402
from training.plan.planner import load_planned_config  # noqa: E402


def fail(message: str, status: int = 2) -> int:
    print(f"bloom-train: error: {message}", file=sys.stderr)
    return status


def dry_run(cfg) -> int:
    import torch.distributed as dist

    from parallelism.topology import Layout, init_model_parallel, init_process_group, shutdown
    from training.config.checks import validate
    from training.plan.run_plan import format_plan, make_plan, write_plan

    layout = validate(cfg)
    # The plan counts parameters on a meta-device model, which needs megatron's TP state (TP=1).
    init_process_group("gloo")
    init_model_parallel(Layout(1, 1, dist.get_world_size()))
    try:
        plan = make_plan(cfg, layout)
        rank = dist.get_rank()
    finally:
        shutdown()
    if rank == 0:
        print(format_plan(plan))
        print(f"plan written to {write_plan(plan, cfg.trainer.run_dir)}")
    return 0


def launch(cfg, argv) -> int:
    """Join the job in the environment, or start the local processes the config asks for."""
    from training.config.checks import procs_per_node, validate

    env = distributed_env()
    if env is not None:
        export_torch_env(env)
    elif not cfg.trainer.dry_run and cfg.launcher.nodes > 1:
        return fail(f"launcher.nodes={cfg.launcher.nodes} needs a cluster launcher: "
                    "submit it with bloom-slurm, or start it under torchrun or srun")
    # Every value, on every path, before anything starts (no process, run dir or engine): one line
    # here, not one traceback per rank. For the job's world size; a training run for this device.
    validate(cfg, trains_here=not cfg.trainer.dry_run)
    if env is None and not cfg.trainer.dry_run:
        from training.evaluation.harness_tasks import check_eval_tasks
        check_eval_tasks(cfg)  # trainer.eval_tasks' task names too
        if procs_per_node(cfg) > 1:
            return relaunch_with_torchrun(procs_per_node(cfg), argv,
                                          log_dir=os.path.join(cfg.trainer.run_dir, "logs", "ranks"))
    if cfg.trainer.dry_run:
        return dry_run(cfg)
    from training.train import run

    return run(cfg)


@record
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        return launch(load_planned_config(argv), argv)
    except (ConfigError, DataError, CheckpointError) as error:
        return fail(str(error))
    except KeyboardInterrupt:
        return fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
