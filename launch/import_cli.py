"""bloom-import: a Hugging Face BloomForCausalLM directory, or a BigScience Megatron-DeepSpeed or
DeepSpeed universal checkpoint -> a checkpoint bloom-train can resume.

    bloom-import HF_DIR --out CHECKPOINTS_DIR [--tokenizer DIR]
    bloom-import --from megatron-deepspeed GLOBAL_STEP_DIR --out CHECKPOINTS_DIR [--tokenizer DIR]
    bloom-import --from universal UNIVERSAL_DIR --out CHECKPOINTS_DIR [--tokenizer DIR]

From Hugging Face: CHECKPOINTS_DIR/iter_00000000 (TP=1 PP=1 DP=1, no optimizer state); reads
safetensors only. From Megatron-DeepSpeed (a global_stepN folder) or a universal checkpoint
(ds_to_universal's output, as BigScience released BLOOM's optimizer states): CHECKPOINTS_DIR/iter_N
at the source's iteration with the fp32 masters, both Adam moments and Adam's step, the consumed
samples and tokens, so training continues where it stopped. Their .pt files are read with a
restricted unpickler: a pickle naming anything but tensors, Megatron's args and DeepSpeed's state is
refused and nothing in it runs. CHECKPOINTS_DIR/latest points at the result; continue with
`bloom-train trainer.resume=CHECKPOINTS_DIR/iter_N` and the model.* values of its config.yaml.
"""
import argparse
import sys
import warnings

from launch.heap import freeze_heap_at_exit

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

PROG = "bloom-import"
EXAMPLES = """Examples:
  bloom-import path/to/bloom-560m --out runs/bloom-560m/checkpoints
  bloom-train model=bloom-560m trainer.run_dir=runs/bloom-560m trainer.resume=runs/bloom-560m/checkpoints/iter_00000000
  bloom-import --from universal bloom-optimizer-states/global_step95000_universal --out runs/bloom/checkpoints
"""
SOURCES = ("hf", "megatron-deepspeed", "universal")


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", metavar="SOURCE",
                        help="HF directory (config.json, *.safetensors), global_stepN folder or universal folder")
    parser.add_argument("--from", dest="source", default="hf", choices=SOURCES,
                        help="what SOURCE is (default: hf)")
    parser.add_argument("--out", required=True, help="checkpoints directory to write iter_N into")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: HF_DIR when it has tokenizer.json)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    freeze_heap_at_exit()  # launch/heap.py: no heap walk at exit
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from data.errors import DataError
    from training.checkpoint.files import CheckpointError
    from training.config.schema import ConfigError
    from training.hf.importer import HFFormatError, import_hf

    try:
        if args.source == "hf":
            final = import_hf(args.hf_dir, args.out, args.tokenizer)
        else:
            from training.bigscience.importer import import_released

            final = import_released(args.source, args.hf_dir, args.out, args.tokenizer)
    except (HFFormatError, CheckpointError, ConfigError, DataError, OSError) as error:
        return fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    print(f"imported {args.hf_dir} -> {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
