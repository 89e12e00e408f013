"""bloom-plan: which TP x PP x DP, micro-batch, recompute, sequence parallelism and ZeRO stage to
run on a cluster, whether it fits, and how long the run takes.

usage: bloom-plan [--json] [--top N] [GROUP=OPTION ...] [KEY=VALUE ...]

  --json       only the configured layout's prediction, one JSON object
  --top N      rank and print the N best layouts (default 10)
  overrides    bloom-train's Hydra overrides (bloom-train --help lists them); model=bloom-<size>
               without experiment= plans BigScience's recipe for that size (experiment=bloom-<size>)

The cluster is launcher.nodes x launcher.gpus_per_node of launcher.gpu_type (configs/hardware/).
Any GPT-shaped model can be given by model.hidden_size, model.num_layers, model.num_heads,
model.vocab_size, model.padded_vocab_size, data.seq_length, trainer.global_batch_size.
The models: training/plan/performance.py (step time), training/plan/memory_estimate.py (memory).
Run the winner with bloom-train ... parallel.auto=true. Imports neither torch nor DeepSpeed.

Examples:
  bloom-plan model=bloom-7b1 launcher.nodes=2 launcher.gpus_per_node=8 launcher.gpu_type=A100-40GB
  bloom-plan experiment=bloom-176b --json
  bloom-plan experiment=bloom-176b launcher.gpu_type=H100-80GB --top 3
"""
import json
import sys
import time
import warnings

from launch.heap import freeze_heap_at_exit

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

PROG = "bloom-plan"


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def with_recipe(overrides):
    """`model=bloom-<size>` without an experiment plans BigScience's recipe for that size
    (experiment=bloom-<size>: its sequence length, batch, rampup, samples, precision and layout,
    the layout being the one ranked against the winner); the other overrides still apply."""
    if any(o.startswith("experiment=") for o in overrides):
        return overrides
    for o in overrides:
        if o.startswith("model=bloom-") and o != "model=bloom-tiny":
            return [f"experiment={o.split('=', 1)[1]}"] + overrides
    return overrides


def main(argv=None) -> int:
    freeze_heap_at_exit()  # launch/heap.py: no heap walk at exit
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    as_json = "--json" in argv
    top = 10
    if "--top" in argv:
        i = argv.index("--top")
        try:
            top = int(argv[i + 1])
        except (IndexError, ValueError):
            return fail("--top needs a number")
        del argv[i:i + 2]
    overrides = [a for a in argv if a != "--json"]
    overrides = with_recipe(overrides)
    from training.config.schema import ConfigError
    from training.plan.plan_report import format_report, prediction_json
    from training.plan.planner import load_planned_config, plan

    try:
        cfg = load_planned_config(overrides)
        if as_json:
            from training.config.checks import validate

            result = plan(cfg)
            validate(cfg, result.world)  # the configured layout: one line if it cannot run
            if result.configured is None:
                return fail("the configured layout cannot be predicted")
            print(json.dumps(prediction_json(cfg, result.configured, result)))
        else:
            print(format_report(cfg, plan(cfg), top))
            print(f"answered in {time.perf_counter() - started:.1f} s (configs, planning and printing)")
    except ConfigError as error:
        return fail(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
