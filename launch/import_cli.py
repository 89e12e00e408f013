"""bloom-import: a Hugging Face BloomForCausalLM directory -> a checkpoint bloom-train can resume.

    bloom-import HF_DIR --out CHECKPOINTS_DIR [--tokenizer DIR]

Writes CHECKPOINTS_DIR/iter_00000000 (TP=1 PP=1 DP=1, no optimizer state) and points
CHECKPOINTS_DIR/latest at it; continue with `bloom-train trainer.resume=CHECKPOINTS_DIR/iter_00000000`
and the model.* values of its config.yaml. Reads safetensors only.
"""
import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

PROG = "bloom-import"
EXAMPLES = """Examples:
  bloom-import path/to/bloom-560m --out runs/bloom-560m/checkpoints
  bloom-train model=bloom-560m trainer.run_dir=runs/bloom-560m trainer.resume=runs/bloom-560m/checkpoints/iter_00000000
"""


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    parser.add_argument("--out", required=True, help="checkpoints directory to write iter_00000000 into")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: HF_DIR when it has tokenizer.json)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from data.errors import DataError
    from training.checkpoint.files import CheckpointError
    from training.config.schema import ConfigError
    from training.hf.importer import HFFormatError, import_hf

    try:
        final = import_hf(args.hf_dir, args.out, args.tokenizer)
    except (HFFormatError, CheckpointError, ConfigError, DataError, OSError) as error:
        return fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    print(f"imported {args.hf_dir} -> {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
