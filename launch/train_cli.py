"""bloom-train: validate the config, then plan (dry run) or train.

Started by hand with launcher.nproc_per_node=N > 1 it starts N local processes with torchrun;
under torchrun or srun it joins the job it finds in the environment. `bloom-train --help` (HELP
below) lists the config groups, read from configs/ when asked, and the most used keys (HELP_KEYS,
each checked against the schema by tests/test_cli_help.py).

--help, config loading and validation import neither torch, megatron-core nor DeepSpeed (except
a 16-bit training run's, which asks DeepSpeed whether this device supports the precision): the
frameworks come in where the dry run or the run needs them.
"""
import faulthandler
import os
import sys
import warnings
from pathlib import Path

# megatron-core warns on import when NVIDIA's optional fused packages are absent; that is expected
# on CPU and would bury the one line a user needs to read.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from data.errors import DataError  # noqa: E402
from launch.env import distributed_env, export_torch_env  # noqa: E402
from launch.heap import quiet_startup, start_collecting  # noqa: E402
from launch.local import relaunch_with_torchrun  # noqa: E402
from training.config.schema import ConfigError  # noqa: E402

HELP = """bloom-train: validate the config, then train BLOOM, or only plan the run (trainer.dry_run=true).

usage: bloom-train [GROUP=OPTION ...] [KEY=VALUE ...]

Every argument is a Hydra override of the config tree in configs/: configs/config.yaml takes one
option of each group below, typed by training/config/schema.py and data/config.py, so an unknown
key or a bad value is one line `bloom-train: error: ...` (exit status 2). No arguments: the CPU
demo, bloom-tiny on the shipped corpus. With launcher.nproc_per_node=N > 1 it starts N local
processes with torchrun; under torchrun or srun it joins the job it finds in the environment;
submit launcher.nodes > 1 with bloom-slurm. bloom-plan says which layout to run.

Config groups (GROUP=OPTION, each configs/GROUP/OPTION.yaml; * the default):
{groups}

Most used keys (KEY=VALUE):
{keys}

Examples:
  bloom-train                                             the CPU demo, a few minutes on 2 cores
  bloom-train experiment=bloom-176b trainer.dry_run=true  BigScience's 176B run: plan it, start nothing
  bloom-train parallel.tp=2 launcher.nproc_per_node=2     the demo on two local processes, TP 2
  bloom-train experiment=bloom-7b1 parallel.auto=true trainer.dry_run=true
"""

# (key=VALUE, what it sets): the keys a run is most often started with. Every key is a field of
# training/config/schema.py or data/config.py (tests/test_cli_help.py walks them).
HELP_KEYS = (
    ("parallel.tp=N", "tensor-parallel degree (Megatron TP)"),
    ("parallel.pp=N", "pipeline stages (DeepSpeed PP)"),
    ("parallel.dp=N", "data-parallel degree; default: world size / (tp x pp)"),
    ("parallel.zero_stage=0|1|2|3", "ZeRO stage over the data-parallel ranks"),
    ("parallel.sequence_parallel=true", "norms and dropouts split along the sequence (needs tp > 1)"),
    ("parallel.auto=true", "run bloom-plan's winner: tp, pp, dp, ZeRO, micro-batch, recompute"),
    ("model.recompute={recompute}", "activations recomputed in backward"),
    ("model.kernels={kernels}", "attention and fused kernels (training/model/kernels.py)"),
    ("trainer.micro_batch_size=N", "sequences per forward pass per data-parallel rank"),
    ("trainer.global_batch_size=N", "sequences per optimizer step"),
    ("trainer.rampup_batch_size=[START,STEP,SAMPLES]", "BLOOM's batch-size rampup; [] for none"),
    ("trainer.train_iters=N", "optimizer steps to train"),
    ("trainer.train_samples=N", "or: sequences to train on"),
    ("trainer.precision={precisions}", "fp16 and bf16 need parallel.zero_stage >= 1"),
    ("trainer.run_dir=DIR", "checkpoints, logs, metrics.jsonl and plan.json go here"),
    ("trainer.resume=auto|none|DIR", "auto: the run dir's latest checkpoint, if any"),
    ("trainer.save_interval=N", "iterations between checkpoints (one is also saved on exit)"),
    ("trainer.keep_checkpoints=K", "newest complete checkpoints kept (0: all)"),
    ("trainer.eval_interval=N", "iterations between validation passes"),
    ("trainer.dry_run=true", "validate, print and write the plan (memory, step time); train nothing"),
    ("trainer.seed=N", "random seed"),
    ("optim.lr=X", "peak learning rate (optim.min_lr: the floor of the decay)"),
    ("optim.warmup_samples=N", "linear warmup, in samples"),
    ("data.seq_length=N", "tokens per sequence"),
    ("data.corpus=[PATH,...]", "raw JSONL files or folders to preprocess; [] with data.blend"),
    ("data.tokenizer.path=DIR", "an existing tokenizer; unset: one is trained on the corpus"),
    ("data.blend=[{{name:en,prefix:/data/en}},...]", "preprocessed .bin/.idx datasets (bloom-preprocess)"),
    ("+data.weights.NAME=W", "a blend dataset's weight (+: a new key); default: from token counts"),
    ("data.cache_dir=DIR", "tokenizer, preprocessed data and index caches"),
    ("logging.log_interval=N", "iterations between log lines"),
    ("logging.wandb=true", "also log to Weights & Biases (logging.wandb_project)"),
    ("launcher.nodes=N", "nodes of the job (> 1: submit with bloom-slurm)"),
    ("launcher.gpus_per_node=N", "GPUs per node (0: a CPU machine)"),
    ("launcher.nproc_per_node=N", "processes per node; default: gpus_per_node, or 1 on CPU"),
    ("launcher.gpu_type={gpus}", "the GPU, from configs/hardware/ (memory, peak rates)"),
)


def _yaml_names(folder: Path) -> list:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def help_text() -> str:
    """HELP with the config groups and options as configs/ holds them now (so the list cannot go
    stale), and the allowed values from where the schema and checks keep them."""
    import configs
    from training.config.checks import PRECISIONS
    from training.config.schema import KERNEL_BACKENDS, RECOMPUTE

    root = Path(configs.__file__).parent
    defaults = {}
    for line in (root / "config.yaml").read_text().splitlines():  # "  - model: bloom-tiny"
        group, _, option = line.strip().lstrip("-").partition(":")
        if line.strip().startswith("- ") and option.strip():
            defaults[group.strip()] = option.strip()
    order = list(defaults)  # config.yaml's order; a folder it does not name comes last
    groups = [d for d in sorted(root.iterdir(), key=lambda d: (order.index(d.name) if d.name in order
                                                               else len(order), d.name))
              if d.is_dir() and d.name != "hardware" and _yaml_names(d)]
    group_lines = []
    for folder in groups:
        options = [name + ("*" if defaults.get(folder.name) == name else "") for name in _yaml_names(folder)]
        if folder.name not in defaults or defaults[folder.name] == "null":
            options.append("(none by default)")
        group_lines.append(f"  {folder.name + '=':12}{' '.join(options)}")
    values = {"recompute": "|".join(RECOMPUTE), "kernels": "|".join(KERNEL_BACKENDS),
              "precisions": "|".join(PRECISIONS), "gpus": "|".join(_yaml_names(root / "hardware"))}
    keys = [(key.format(**values), text) for key, text in HELP_KEYS]
    width = max(len(key) for key, _ in keys if len(key) <= 34)
    key_lines = [f"  {key}\n  {'':{width}}  {text}" if len(key) > width else f"  {key:{width}}  {text}"
                 for key, text in keys]
    return HELP.format(groups="\n".join(group_lines), keys="\n".join(key_lines))


def fail(message: str, status: int = 2) -> int:
    print(f"bloom-train: error: {message}", file=sys.stderr)
    return status


def dry_run(cfg) -> int:
    from training.config.checks import validate

    layout = validate(cfg)  # before the frameworks: a refused config waits for no torch import
    quiet_deepspeed()
    import torch.distributed as dist

    from parallelism.topology import Layout, init_model_parallel, init_process_group, shutdown
    from training.plan.run_plan import format_plan, make_plan, write_plan

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
            start_collecting()  # this process waits on torchrun for the whole run: collect again
            return relaunch_with_torchrun(procs_per_node(cfg), argv,
                                          log_dir=os.path.join(cfg.trainer.run_dir, "logs", "ranks"))
    if cfg.trainer.dry_run:
        return dry_run(cfg)
    quiet_deepspeed()
    from training.train import run

    start_collecting()  # the frameworks are in: their objects are frozen, the rest is watched
    return run(cfg)


def quiet_deepspeed() -> None:
    """DeepSpeed warns on import that it found no GPU and uses its CPU accelerator: on a machine
    without CUDA that is the plan, not news. Naming the accelerator keeps its console quiet. This
    imports torch, so it runs where the frameworks are needed: before a dry run, a run, and a 16-bit
    run's validation (DeepSpeed says whether this device supports it)."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def run_config(argv) -> int:
    from training.plan.planner import load_planned_config

    try:
        cfg = load_planned_config(argv)
    except (ConfigError, DataError) as error:
        return fail(str(error))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    if not cfg.trainer.dry_run and cfg.trainer.precision != "fp32":
        quiet_deepspeed()  # validating a 16-bit run asks DeepSpeed's accelerator (parallelism/precision_support.py)
    try:
        return launch(cfg, argv)
    except (ConfigError, DataError) as error:
        return fail(str(error))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as error:
        # training.checkpoint.files imports torch, so its CheckpointError is looked up, not imported:
        # only a run that has imported that module can raise one.
        files = sys.modules.get("training.checkpoint.files")
        if files is not None and isinstance(error, files.CheckpointError):
            return fail(str(error))
        raise


@quiet_startup  # launch/heap.py: no heap walks during the imports and at exit
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text())
        return 0
    # What torchelastic's @record does, without importing torch for it outside a torchrun worker:
    # a crash prints every thread's stack; under torchrun the traceback also goes to the error file.
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, OSError, ValueError):  # stderr without a file descriptor (captured)
        pass
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(run_config)(argv)
    return run_config(argv)


if __name__ == "__main__":
    sys.exit(main())
