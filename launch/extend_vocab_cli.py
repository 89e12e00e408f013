"""bloom-extend-vocab: add a new language's tokens to a BLOOM model, to continue pretraining on it.

    bloom-extend-vocab MODEL --add-tokens TOKENIZER_DIR | TEXT... --out DIR [--init mean|normal]
                       [--new-tokens N] [--tp N] [--checkpoint-out CHECKPOINTS_DIR]

MODEL is a Hugging Face BloomForCausalLM directory (safetensors) or one of our checkpoints. The
tokens come from another byte-level BPE tokenizer directory, or from a BPE trained on the new
language's text (JSONL / Parquet / HF dataset records, or .txt lines) as our tokenizer trainer
trains one. They are appended to MODEL's tokenizer: every old id and merge keeps its place and
text of the old languages tokenizes exactly as before; a new token that text could contain is
left out. The tied embedding grows to the new vocabulary padded to a multiple of 128 x --tp rows;
new rows start at the mean of the old ones (--init normal: N(0, the model's init std)).

DIR is a Hub directory (config.json with the new vocab_size, weights, extended tokenizer);
--checkpoint-out also imports it as bloom-import does, for `bloom-train` to resume.
"""
import argparse
import sys
import warnings

from launch.heap import freeze_heap_at_exit

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

PROG = "bloom-extend-vocab"
EXAMPLES = """Examples:
  bloom-extend-vocab path/to/bloom-560m --add-tokens ka/*.jsonl --new-tokens 5000 --out hf/bloom-560m-ka --checkpoint-out runs/bloom-560m-continue/checkpoints
  bloom-extend-vocab runs/bloom-tiny/checkpoints --add-tokens path/to/other-tokenizer --out hf/bloom-tiny-ext
  bloom-train experiment=bloom-560m-continue
"""


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Hub directory (config.json + *.safetensors) or checkpoint(s) directory")
    parser.add_argument("--add-tokens", nargs="+", required=True, metavar="TOKENIZER_OR_TEXT",
                        help="a tokenizer directory, or the new language's text files / JSONL / folders")
    parser.add_argument("--out", required=True, help="the Hub directory to create (must not exist or be empty)")
    parser.add_argument("--init", default="mean", choices=("mean", "normal"),
                        help="new rows: mean of the old rows (default) or N(0, init std)")
    parser.add_argument("--init-std", type=float, help="std for --init normal (default: config.json's initializer_range)")
    parser.add_argument("--new-tokens", type=int, default=2000,
                        help="BPE merges to learn on the text (fewer are added when the text runs out "
                             "or a token could occur in old text); ignored for a tokenizer directory")
    parser.add_argument("--min-frequency", type=int, default=2, help="BPE trainer's min_frequency on the text")
    parser.add_argument("--tp", type=int, default=1, help="pad the rows so TP this size splits them (default 1)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=128, help="model.pad_vocab_to_multiple_of")
    parser.add_argument("--seed", type=int, default=0, help="seed of --init normal")
    parser.add_argument("--tokenizer", help="MODEL's tokenizer directory (default: MODEL's own)")
    parser.add_argument("--checkpoint-out", metavar="CHECKPOINTS_DIR",
                        help="also import DIR there as iter_00000000 (bloom-import), for bloom-train")
    return parser.parse_args(argv)


def check_args(args) -> str:
    """'' when the numbers make sense, else the one-line reason."""
    for name in ("new_tokens", "min_frequency", "tp", "pad_to_multiple_of"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if args.init_std is not None and args.init_std <= 0:
        return f"--init-std must be positive, got {args.init_std}"
    return ""


def main(argv=None) -> int:
    freeze_heap_at_exit()  # launch/heap.py: no heap walk at exit
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = check_args(args)
    if problem:
        return fail(problem)
    from data.errors import DataError
    from training.checkpoint.files import CheckpointError
    from training.config.schema import ConfigError
    from training.hf.export import ExportError
    from training.hf.extend_vocab import extend_model
    from training.hf.importer import HFFormatError
    from training.hf.self_check import SelfCheckFailed

    try:
        result = extend_model(args.model, args.add_tokens, args.out, args.init, args.new_tokens, args.tp,
                              args.pad_to_multiple_of, args.seed, args.tokenizer, args.min_frequency,
                              args.init_std, args.checkpoint_out)
    except (HFFormatError, ExportError, CheckpointError, ConfigError, DataError, OSError) as error:
        text = str(error).strip()
        return fail(text.splitlines()[0] if text else type(error).__name__)
    except SelfCheckFailed as error:  # exporting MODEL (our checkpoint) found a wrong conversion
        print(f"{PROG}: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"extended {args.model} -> {result.directory}: {result.new_vocab - result.old_vocab} tokens added "
          f"({result.old_vocab} -> {result.new_vocab}), embedding rows {result.old_rows} -> {result.new_rows}")
    resume = ""
    if result.checkpoint is not None:
        print(f"imported -> {result.checkpoint}")
        resume = f" trainer.resume={result.checkpoint}"
    print(f"continue with: bloom-train model.vocab_size={result.new_vocab} model.padded_vocab_size={result.new_rows} "
          f"data.tokenizer.path={result.directory}{resume}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
