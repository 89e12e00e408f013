"""bloom-train: validate the config, then plan (dry run) or train.

    bloom-train [hydra overrides...]     e.g. experiment=bloom-176b trainer.dry_run=true
"""
import sys
import warnings

# megatron-core warns on import when NVIDIA's optional fused packages are absent; that is expected
# on CPU and would bury the one line a user needs to read.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from training.config_loader import ConfigError, load_config


def fail(message: str) -> int:
    print(f"bloom-train: error: {message}", file=sys.stderr)
    return 2


def dry_run(cfg) -> int:
    from parallelism.topology import Layout, init_model_parallel, init_process_group, shutdown
    from training.config_checks import validate
    from training.plan import format_plan, make_plan, write_plan

    layout = validate(cfg)
    # The plan counts parameters on a meta-device model, which needs megatron's TP state (TP=1 here).
    init_process_group("gloo")
    init_model_parallel(Layout(1, 1, 1))
    try:
        plan = make_plan(cfg, layout)
    finally:
        shutdown()
    print(format_plan(plan))
    print(f"plan written to {write_plan(plan, cfg.trainer.run_dir)}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        cfg = load_config(argv)
        if cfg.trainer.dry_run:
            return dry_run(cfg)
        from training.train import run

        return run(cfg)
    except ConfigError as error:
        return fail(str(error))


if __name__ == "__main__":
    sys.exit(main())
