"""`bloom-preprocess`: JSONL / Parquet / Arrow / HF datasets -> megatron-core .bin/.idx, one per language or source.

    bloom-preprocess --input data/corpora 'corpus/data/*/train/*.parquet' --tokenizer TOKDIR
                     --output-dir OUT [--workers N] [--group-by lang|source] [--text-key text]
                     [--lang-key lang] [--lang-from-path] [--strict]
    bloom-preprocess ... --tokenizer TOKDIR --slurm --shards N [--nodes K] [--submit]

Without --tokenizer, --train-tokenizer-vocab N first trains a BLOOM-style tokenizer on the
inputs (alpha-smoothed) into OUT/tokenizer. Errors print one line `error: ...`, exit status 2.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

from data.errors import DataError
from launch.heap import freeze_heap_at_exit

EXAMPLES = """Inputs: JSONL (.jsonl, .ndjson, .jsonl.gz/.bz2/.xz/.zst), Parquet (.parquet), Arrow IPC
(.arrow, .feather; file or stream format) and HF save_to_disk dirs; files, folders (searched
recursively) and glob patterns (quote them: they are expanded here, ** for any depth), mixed
freely in one run. Parquet is read one row group at a time, only the text and language columns.

Bad records are skipped and counted per kind in OUTPUT_DIR/summary.json, listed as file:line
(JSONL) or file:row (0-based, tables): not_utf8, not_json, no_text (no string text: missing, or
a non-string value or column type), empty_text (empty or whitespace), null_text (null). A file
that cannot be read as its format (a .parquet that is not Parquet, a truncated one) is named in
one `warning:` line, counted in the summary's bad_files and passed over; --strict stops instead.
A file without the --text-key column is an error naming the columns it has.

--lang-from-path takes a file's language from its path when its rows have none (no --lang-key
field or column): the folder directly below the last folder named `data` below the input
(FineWeb-2's data/<language>/train/*.parquet), else the first folder below the input folder or
the glob's fixed leading folders, else the file name (as without the option).

--slurm cuts the inputs into --shards N pieces (at file or Parquet row-group boundaries, balanced by
bytes) and writes an array job (a task per shard, writing OUTPUT_DIR/shards/shard-NNNNN aside and
renaming it when complete) and a merge job after it (megatron-core's IndexedDatasetBuilder.add_index,
shards in order: the files are byte for byte a one-machine run's). The same command again redoes
only the shards not finished; `python -m data.shard_merge OUTPUT_DIR` merges by hand.

Without --tokenizer, --train-tokenizer-vocab N first trains a BLOOM-style tokenizer on the
inputs (alpha-smoothed) into OUTPUT_DIR/tokenizer. Errors print one line `error: ...`, exit status 2.

Examples:
  bloom-preprocess --input data/corpora --train-tokenizer-vocab 8000 --output-dir data_cache/processed
  bloom-preprocess --input /data/oscar --tokenizer path/to/bloom-tokenizer --output-dir /data/processed --workers 32
  bloom-preprocess --input 'fineweb-2/data/*/train/*.parquet' --lang-from-path --tokenizer path/to/bloom-tokenizer --output-dir /data/fw2
  bloom-preprocess --input 'roots/**/*.parquet' --lang-key lang --tokenizer TOKDIR -o /shared/roots --slurm --shards 512 --nodes 32 --partition cpu --submit
  bloom-preprocess --input wiki.parquet code/ extra.jsonl.gz --text-key content --lang-key language --tokenizer TOKDIR -o OUT --strict
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bloom-preprocess", description=__doc__.split("\n\n")[0].replace("`", ""),
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", "-i", nargs="+", required=True,
                   help="JSONL (.gz/.bz2/.xz/.zst too), Parquet or Arrow files, folders or quoted globs "
                        "of them, or HF dataset dirs")
    p.add_argument("--output-dir", "-o", required=True, help="where <name>.bin/.idx and summary.json go")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="tokenizer directory (ours or the released BLOOM one)")
    tok.add_argument("--train-tokenizer-vocab", type=int, metavar="N",
                     help="train a BLOOM-style BPE of N tokens on the inputs into OUTPUT_DIR/tokenizer")
    p.add_argument("--alpha", type=float, default=0.3, help="language smoothing of the tokenizer sample")
    p.add_argument("--group-by", choices=["lang", "source"], default="lang",
                   help="one output per language field value (default) or per input file")
    p.add_argument("--text-key", default="text", help="the field (JSONL) or column (tables) holding the text")
    p.add_argument("--lang-key", default="lang", help="the field or column holding the language")
    p.add_argument("--lang-from-path", action="store_true",
                   help="a file's language from its path when its rows have none: the folder below "
                        "`data/` (FineWeb-2 layout), else the first folder below the input")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores); with --slurm, the CPUs of each "
                        "shard task (default: a whole node each)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 18, help="bytes of input per worker task")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad line or row (naming file:line or file:row) or unreadable file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from launch.preprocess_slurm import add_arguments

    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> dict:
    # Imported here so `--help` and argument errors stay instant.
    from data.preprocess_run import PreprocessOptions, preprocess
    from data.records import RecordKeys
    from data.tokenizer_train import train_tokenizer

    keys = RecordKeys(text=args.text_key, lang=args.lang_key)
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        tokenizer_dir = train_tokenizer(args.input, Path(args.output_dir) / "tokenizer",
                                        vocab_size=args.train_tokenizer_vocab, alpha=args.alpha, keys=keys)
    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    options = PreprocessOptions(keys=keys, group_by=args.group_by, workers=args.workers, strict=args.strict,
                                chunk_bytes=args.chunk_bytes, progress=not args.quiet,
                                lang_from_path=args.lang_from_path)
    return preprocess(args.input, tokenizer_dir, args.output_dir, options)


def run_slurm(args: argparse.Namespace) -> dict:
    """--slurm: the plan and the jobs (launch/preprocess_slurm.py); the shards do the work."""
    from data.sources import expand_inputs
    from launch import preprocess_slurm

    opts = preprocess_slurm.checked_options(args)
    plan_options = {"text_key": args.text_key, "lang_key": args.lang_key, "group_by": args.group_by,
                    "strict": args.strict, "chunk_bytes": args.chunk_bytes}
    sources = expand_inputs(args.input, lang_from_path=args.lang_from_path)
    command = " ".join(["bloom-preprocess", *map(shlex.quote, sys.argv[1:])])
    return preprocess_slurm.run(sources, args.tokenizer, plan_options, args.output_dir, opts,
                                submit=args.submit, command=command)


def main(argv: list[str] | None = None) -> int:
    freeze_heap_at_exit()  # launch/heap.py: no heap walk at exit
    args = build_parser().parse_args(argv)
    try:
        if not args.slurm:
            from launch.preprocess_slurm import refuse_without_slurm

            refuse_without_slurm(args)
        summary = run_slurm(args) if args.slurm else run(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # sbatch refused the job
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    if args.slurm:
        from launch.preprocess_slurm import describe

        print(json.dumps(summary) if args.submit else describe(summary))
        return 0
    total = summary["total"]
    print(json.dumps({"output_dir": args.output_dir, **total, "seconds": summary["seconds"],
                      "tokens_per_second": summary["tokens_per_second"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
