"""bloom-eval: loss and perplexity of a checkpoint or an HF BLOOM directory on JSONL text, and
lm-evaluation-harness tasks on it.

    bloom-eval CHECKPOINT_OR_HF_DIR [--data PATH.jsonl [PATH ...]] [--seq-length N] [--batch-size B]
               [--tasks T1,T2 [--include-path DIR] [--limit N] [--num-fewshot K] [--log-samples]]
               [--out FILE] [--tokenizer DIR]
               [parallel.tp=2 parallel.pp=2 launcher.nproc_per_node=4 model.kernels=eager]

Prints one JSON object on stdout: "overall" and "languages" (per `lang` field), each with loss
(mean token cross entropy over every predicted token), perplexity (exp of it), tokens, sequences,
documents. How text becomes sequences: training/evaluation/eval_data.py. Any TP x PP (x DP) layout runs;
with launcher.nproc_per_node > 1 and no launcher around it, the command re-runs itself under
torchrun. An HF directory is first imported to a temporary checkpoint (bloom-import). Only
parallel.*, launcher.* and model.kernels overrides apply; the model's shape comes from the
checkpoint. Arguments of the form key=value are overrides (a data path may not contain "=").

--tasks runs lm_eval tasks (pip install '.[eval]') through training/evaluation/harness.py at the
same layout, without exporting: log-likelihood and multiple-choice tasks and rolling perplexities
(generation tasks are refused), requests up to --seq-length tokens (the checkpoint's
data.seq_length; longer ones left-truncated, as lm_eval's HF model does). The JSON then has
"harness": {"scores": {task: {metric: value}}, ...} (with --log-samples, every request's answer),
and is also written to --out FILE, or, for a checkpoint at RUN_DIR/checkpoints/iter_N, to
RUN_DIR/harness/iter_N-eval.json, where bloom-export finds it for the model card's model-index.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from launch.heap import quiet_startup, start_collecting

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

PROG = "bloom-eval"
EXAMPLES = """Examples:
  bloom-eval runs/bloom-tiny/checkpoints --data data/corpora/udhr
  bloom-eval runs/bloom-tiny/checkpoints/iter_00000300 --data data/corpora/udhr/en.jsonl --seq-length 128
  bloom-eval path/to/bloom-560m --tasks lambada_openai,arc_easy --limit 100 --out scores.json
  bloom-eval runs/bloom-tiny/checkpoints --data data/corpora/udhr parallel.tp=2 launcher.nproc_per_node=2
"""
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
ALLOWED_OVERRIDES = ("parallel.", "launcher.", "model.kernels=")
RESULT_FLAG, SOURCE_FLAG = "--result-file", "--source"


class UsageError(ValueError):
    pass


def fail(message: str, status: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint dir, checkpoints dir with `latest`, or HF dir")
    parser.add_argument("--data", nargs="+", help="JSONL files or folders (text, lang)")
    parser.add_argument("--seq-length", type=int, help="default: the checkpoint config's data.seq_length, else 2048")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--tokenizer", help="default: the checkpoint's tokenizer/")
    parser.add_argument("--tasks", help="comma-separated lm_eval task names")
    parser.add_argument("--include-path", help="a folder of lm_eval task YAMLs")
    parser.add_argument("--limit", type=float, help="documents per task (a fraction when < 1)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--log-samples", action="store_true", help="every request's answer in the JSON")
    parser.add_argument("--out", help="also write the JSON here")
    # Set by the torchrun relaunch: where rank 0 writes its result, and the path the user gave.
    parser.add_argument(RESULT_FLAG, help=argparse.SUPPRESS)
    parser.add_argument(SOURCE_FLAG, help=argparse.SUPPRESS)
    return parser


def parse_args(argv):
    overrides = [a for a in argv if OVERRIDE.match(a)]
    options = [a for a in argv if not OVERRIDE.match(a)]
    args = build_parser().parse_args(options)
    for override in overrides:
        if not override.startswith(ALLOWED_OVERRIDES):
            raise UsageError(f"{override}: only parallel.*, launcher.* and model.kernels apply to "
                             "evaluation (the model's shape comes from the checkpoint)")
    if args.batch_size < 1 or (args.seq_length is not None and args.seq_length < 1):
        raise UsageError("--batch-size and --seq-length must be positive")
    args.tasks = [t for t in (args.tasks or "").split(",") if t]
    if not args.data and not args.tasks:
        raise UsageError("nothing to evaluate: give --data (loss) and/or --tasks (harness)")
    return args, overrides


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "manifest.json").is_file() \
        and not (path / "latest").is_file()


def as_checkpoint(path: str, tokenizer, workdir: Path) -> Path:
    """The checkpoint to evaluate: the path itself, or an HF directory imported under workdir."""
    from training.hf.importer import import_hf

    source = Path(path)
    return import_hf(source, workdir / "imported", tokenizer) if is_hf_dir(source) else source


@contextlib.contextmanager
def stdout_to_stderr():
    """Route fd 1 to stderr while the model runs: DeepSpeed and megatron log to stdout, and the
    JSON object must be the only thing there."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# -- one rank ------------------------------------------------------------------------------------

def evaluate_rank(args, cfg) -> dict:
    """Evaluate as one rank of the job (a one-process job when no launcher started it)."""
    import torch.distributed as dist

    from data.tokenizer import TokenizerInfo
    from parallelism.topology import Layout, init_model_parallel, init_process_group, shutdown
    from training.evaluation.eval_data import OVERALL, build_eval_sets, read_documents
    from training.evaluation.evaluate import build_stage, evaluate_sets
    from training.checkpoint.saved_model import model_config, open_checkpoint, saved_config

    init_process_group()
    workdir = Path(tempfile.mkdtemp(prefix=f"bloom-eval-rank{dist.get_rank()}-"))
    try:
        tp, pp, world = cfg.parallel.tp, cfg.parallel.pp, dist.get_world_size()
        checkpoint = as_checkpoint(args.checkpoint, args.tokenizer, workdir)
        check_request(checkpoint, cfg, world)
        layout = Layout(tp, pp, world // (tp * pp))
        directory, manifest, shape = open_checkpoint(checkpoint)
        model_cfg = model_config(shape, kernels=cfg.model.kernels)
        verify_model_files(directory, manifest)
        init_model_parallel(layout)
        tokenizer = TokenizerInfo(args.tokenizer or _checkpoint_tokenizer(directory))
        seq_length = args.seq_length or ((saved_config(directory) or {}).get("data") or {}).get("seq_length") or 2048
        device = _device()
        model = build_stage(model_cfg, directory, shape, device)
        source = args.source or args.checkpoint
        report = {
            "model": str(source), "imported_from_hf": bool(manifest.get("imported_from")) and is_hf_dir(Path(source)),
            "iteration": manifest.get("iteration"),
            "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
            "seq_length": seq_length, "batch_size": args.batch_size, "tokenizer_vocab": tokenizer.vocab_size,
            "rank": dist.get_rank(),
        }
        if args.data:
            sets = build_eval_sets(read_documents(args.data), tokenizer.encode_batch, tokenizer.eod,
                                   shape["padded_vocab_size"])
            results = evaluate_sets(model, sets, seq_length, args.batch_size, shape["hidden_size"], device)
            report.update(overall=results[OVERALL],
                          languages={name: r for name, r in results.items() if name != OVERALL})
        if args.tasks:
            report["harness"] = harness_report(args, model, tokenizer, seq_length, device)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutdown()


def harness_report(args, model, tokenizer, seq_length: int, device) -> dict:
    """lm_eval's tasks on this job's model (training/evaluation/harness.py)."""
    from training.evaluation.harness import BloomHarnessLM, StageForward
    from training.evaluation.harness_tasks import run_tasks, task_manager

    lm = BloomHarnessLM(StageForward.of_stage_model(model, device), tokenizer, seq_length, args.batch_size)
    return run_tasks(lm, args.tasks, task_manager(args.include_path, args.tasks), args.limit, args.num_fewshot,
                     args.log_samples)


def publish(report: dict, args) -> None:
    """Print the JSON object; write it to --out, and the harness part beside a run's checkpoints."""
    from training.checkpoint.saved_model import resolve_checkpoint
    from training.evaluation.harness_tasks import report_path, run_dir_of, write_report

    text = json.dumps(report, sort_keys=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if "harness" in report and not report["imported_from_hf"]:
        run_dir = run_dir_of(resolve_checkpoint(args.source or args.checkpoint))
        if run_dir is not None and report["iteration"] is not None:
            harness = {**report["harness"], "iteration": report["iteration"], "layout": report["layout"],
                       "source": "bloom-eval"}
            path = report_path(run_dir, report["iteration"])
            write_report(path.with_name(path.stem + "-eval.json"), harness)
    print(text, flush=True)


def verify_model_files(directory: Path, manifest: dict) -> None:
    """Checksums of the model files before they are read (every rank reads them all)."""
    from training.checkpoint.files import verify

    verify(directory, [f for f in manifest["files"] if f.startswith("model/")])


def _checkpoint_tokenizer(directory: Path) -> Path:
    from training.checkpoint.files import CheckpointError

    path = directory / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{directory} has no tokenizer/: pass --tokenizer DIR")
    return path


def _device():
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def run_here(args, cfg) -> int:
    """This process is one rank (alone, or started by torchrun/srun); rank 0 reports."""
    from training.hf.self_check import launcher_env_restored

    with stdout_to_stderr(), launcher_env_restored():
        report = evaluate_rank(args, cfg)
    if report.pop("rank") != 0:
        return 0
    if args.result_file:  # a rank under bloom-eval's own relaunch: the parent publishes
        Path(args.result_file).write_text(json.dumps(report, sort_keys=True) + "\n")
    else:
        publish(report, args)
    return 0


# -- the local relaunch ----------------------------------------------------------------------------

def check_request(checkpoint: Path, cfg, world: int) -> None:
    """The layout fits the world size and the saved model (one-line errors, no process group)."""
    from training.evaluation.evaluate import EvalLayoutError, check_layout
    from training.checkpoint.saved_model import model_config, open_checkpoint

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise EvalLayoutError(f"world size {world} is not a multiple of parallel.tp x parallel.pp = {tp} x {pp}")
    _, _, shape = open_checkpoint(checkpoint)
    check_layout(model_config(shape, kernels=cfg.model.kernels), tp, pp)


def relaunch(args, cfg, argv, nproc: int) -> int:
    """Run this command in nproc local processes under torchrun; print rank 0's result here."""
    from launch.local import run_forwarding_signals, torchrun_command
    from training.evaluation.eval_data import read_documents

    workdir = Path(tempfile.mkdtemp(prefix="bloom-eval-"))
    logs = Path(tempfile.mkdtemp(prefix="bloom-eval-ranks-"))
    try:
        checkpoint = as_checkpoint(args.checkpoint, args.tokenizer, workdir)  # import once, not per rank
        check_request(checkpoint, cfg, nproc)  # refuse a bad layout before starting processes
        if args.data:
            read_documents(args.data)  # and a bad corpus line, in one line rather than once per rank
        child = [str(checkpoint)] + [a for a in argv if a != args.checkpoint]
        child += [RESULT_FLAG, str(workdir / "result.json"), SOURCE_FLAG, args.checkpoint]
        status = run_forwarding_signals(torchrun_command(nproc, child, entry="launch.eval_cli", log_dir=logs))
        if status != 0:
            return fail(f"evaluation failed (exit {status}); every rank's output is under {logs}", status=status)
        publish(json.loads((workdir / "result.json").read_text()), args)
        shutil.rmtree(logs, ignore_errors=True)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@quiet_startup  # launch/heap.py: no heap walks during the imports and at exit
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(build_parser().format_help())  # the description, the options, then the examples
        return 0
    from data.errors import DataError
    from launch.env import distributed_env, export_torch_env
    from training.checkpoint.files import CheckpointError
    from training.config.checks import procs_per_node
    from training.config.schema import ConfigError
    from training.plan.planner import load_planned_config
    from training.evaluation.evaluate import EvalLayoutError
    from training.evaluation.harness_tasks import HarnessConfigError, check_tasks
    from training.hf.importer import HFFormatError
    from training.model.kernels import KernelUnavailable

    start_collecting()  # the frameworks are in: their objects are frozen, the rest is watched
    try:
        args, overrides = parse_args(argv)
        cfg = load_planned_config(overrides)
        if args.tasks and distributed_env() is None:  # a misspelt task: one line, before any process starts
            check_tasks(args.tasks, args.include_path, args.limit)
        nproc = cfg.launcher.nodes * procs_per_node(cfg)
        env = distributed_env()  # torchrun's variables, or srun's translated as bloom-train does
        if env is not None:
            export_torch_env(env)
            return run_here(args, cfg)
        if nproc == 1:
            return run_here(args, cfg)
        if cfg.launcher.nodes > 1:
            raise UsageError(f"launcher.nodes={cfg.launcher.nodes}: start multi-node evaluation with "
                             "srun or torchrun on every node")
        return relaunch(args, cfg, argv, nproc)
    except (UsageError, ConfigError, CheckpointError, HFFormatError, DataError, EvalLayoutError,
            KernelUnavailable, HarnessConfigError) as error:
        return fail(str(error).splitlines()[0] if str(error) else type(error).__name__)


if __name__ == "__main__":
    sys.exit(main())
