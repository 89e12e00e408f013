"""bloom-export: a checkpoint (any TP/PP/DP layout) -> a Hugging Face Hub directory, or Megatron-DeepSpeed.

    bloom-export CHECKPOINT --out DIR [--dtype bf16|fp16|fp32] [--max-shard-size 2GB]
                 [--push-to-hub REPO [--private]] [--skip-self-check] [--flax] [--harness-results FILE]
    bloom-export CHECKPOINT --to megatron-deepspeed OUT [--tp N] [--pp M]

--to megatron-deepspeed writes OUT/global_stepN as BigScience's Megatron-DeepSpeed saved BLOOM
(layer files, mp_rank files with args and universal-checkpoint info, BF16-optimizer files with the
fp32 masters and Adam's moments) at TP N x PP M and DP 1, and OUT/latest; DeepSpeed's
`python -m deepspeed.checkpoint.ds_to_universal --input_folder OUT/global_stepN --output_folder U`
converts it to a universal checkpoint.

CHECKPOINT is a checkpoint directory (iter_XXXXXXXX) or a checkpoints directory with `latest`.
Checksums are verified first; before DIR appears, the exported model is loaded with
transformers and its logits compared with the training model's (--skip-self-check only for models
too large to hold twice in this machine's memory). --flax also writes flax_model.msgpack (sharded
like the safetensors), which transformers 4.x's FlaxBloomModel / FlaxBloomForCausalLM load.
The model card's model-index holds the lm-evaluation-harness scores of this checkpoint: those in
--harness-results FILE (bloom-eval --tasks --out), else RUN_DIR/harness/iter_N*.json.
"""
import argparse
import sys
import warnings

from launch.heap import freeze_heap_at_exit

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

PROG = "bloom-export"
EXAMPLES = """Examples:
  bloom-export runs/bloom-tiny/checkpoints --out hf/bloom-tiny
  bloom-export runs/bloom-176b/checkpoints/iter_00095000 --out hf/bloom-176b --max-shard-size 5GB --skip-self-check
  bloom-export runs/bloom-tiny/checkpoints --out hf/bloom-tiny --push-to-hub me/bloom-tiny --private
  bloom-export runs/bloom-tiny/checkpoints --to megatron-deepspeed mds/bloom-tiny --tp 2 --pp 2
"""
TARGETS = ("megatron-deepspeed",)


def fail(message: str, status: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="iter_XXXXXXXX directory, or a checkpoints directory with `latest`")
    parser.add_argument("--out", help="the HF directory to create (must not exist or be empty)")
    parser.add_argument("--to", nargs=2, metavar=("FORMAT", "OUT"),
                        help="write another training framework's checkpoint instead: megatron-deepspeed OUT")
    parser.add_argument("--tp", type=int, default=1, help="with --to: tensor-parallel size of the files")
    parser.add_argument("--pp", type=int, default=1, help="with --to: pipeline stages of the files")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--max-shard-size", default="2GB", help="HF size string (2GB, 500MB) or bytes")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload DIR to this Hub repo afterwards")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--skip-self-check", action="store_true")
    parser.add_argument("--flax", action="store_true",
                        help="also write flax_model.msgpack (transformers 4.x Flax BLOOM)")
    parser.add_argument("--harness-results", metavar="FILE",
                        help="harness scores for the card's model-index (default: the run dir's for this iteration)")
    return parser.parse_args(argv)


def _one_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def export_to(args) -> int:
    """bloom-export CHECKPOINT --to megatron-deepspeed OUT [--tp N --pp M]."""
    from training.bigscience.export import ExportError, export_megatron_deepspeed
    from training.checkpoint.files import CheckpointError

    target, out = args.to
    if target not in TARGETS:
        return fail(f"--to {target}: unknown format; choose from {', '.join(TARGETS)}")
    try:
        final = export_megatron_deepspeed(args.checkpoint, out, args.tp, args.pp)
    except (ExportError, CheckpointError, OSError) as error:
        return fail(_one_line(error))
    print(f"exported {args.checkpoint} -> {final} (Megatron-DeepSpeed, TP {args.tp} x PP {args.pp}, DP 1); "
          f"convert with: python -m deepspeed.checkpoint.ds_to_universal --input_folder {final} --output_folder U")
    return 0


def main(argv=None) -> int:
    freeze_heap_at_exit()  # launch/heap.py: no heap walk at exit
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.to:
        return export_to(args)
    if not args.out:
        return fail("--out DIR is required (or --to megatron-deepspeed OUT)")
    if (args.tp, args.pp) != (1, 1):
        return fail("--tp and --pp apply to --to megatron-deepspeed only")
    from data.errors import DataError
    from training.checkpoint.files import CheckpointError
    from training.hf.export import ExportError, export_checkpoint, push_to_hub
    from training.hf.self_check import SelfCheckFailed

    from training.hf.model_card import harness_file_scores

    size = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
    try:
        harness = harness_file_scores(args.harness_results) if args.harness_results else None
    except ValueError as error:
        return fail(_one_line(error))
    try:
        result = export_checkpoint(args.checkpoint, args.out, args.dtype, size,
                                   run_self_check=not args.skip_self_check, flax=args.flax, harness=harness)
    except (ExportError, CheckpointError, DataError, OSError) as error:
        return fail(_one_line(error))
    except SelfCheckFailed as error:
        return fail(_one_line(error), status=1)
    check = ("self-check skipped" if result.self_check is None
             else f"self-check: logits max abs diff {result.self_check:.2e}")
    print(f"exported {result.checkpoint} (iteration {result.iteration}) -> {result.directory} "
          f"({args.dtype}, {result.shards} shard{'s' if result.shards > 1 else ''}; {check})")
    if args.push_to_hub:
        try:
            url = push_to_hub(result.directory, args.push_to_hub, args.private)
        except Exception as error:  # the Hub's errors are many (auth, network, naming); report one line
            return fail(f"push to {args.push_to_hub} failed: {_one_line(error)}", status=1)
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
