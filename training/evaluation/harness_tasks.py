"""Running lm-evaluation-harness tasks with BloomHarnessLM (training/evaluation/harness.py), and
where their scores go: a JSON report (bloom-eval --tasks, and run_dir/harness/iter_N.json from
training), metrics.jsonl keys `harness/<task>/<metric>` (trainer.eval_tasks), and the exported
model card's model-index (training/hf/model_card.py reads the report).

Every rank of the job runs the same lm_eval calls (see harness.py); only rank 0 writes. lm_eval
seeds Python's, numpy's and torch's global generators; a run during training restores them
afterwards, so training after an evaluation continues as it would have without one.
"""
import contextlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from training.config.schema import ConfigError

BOOTSTRAP_ITERS = 1000  # stderr of the non-mean metrics (perplexities); lm_eval's default 100000 takes minutes


class HarnessConfigError(ConfigError):
    """A task list, include path or limit the harness cannot run; one line (bloom-train and
    bloom-eval print it as their error)."""


def task_manager(include_path: Optional[str], tasks: List[str] = ()):
    """lm_eval's TaskManager; only the include path's tasks when it holds every one asked for
    (indexing lm_eval's own ~15,000 task YAMLs takes seconds in every process)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessConfigError("harness tasks need lm-eval: pip install '.[eval]'") from None

    if include_path is None:
        return TaskManager()
    if not Path(include_path).is_dir():
        raise HarnessConfigError(f"harness include path {include_path} is not a directory")
    local = TaskManager(include_path=include_path, include_defaults=False)
    if tasks and all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(include_path=include_path)


def check_tasks(tasks: List[str], include_path: Optional[str], limit=None):
    """The TaskManager that knows every named task; an unknown name is one error line."""
    if not tasks:
        raise HarnessConfigError("no harness tasks given")
    if limit is not None and limit <= 0:
        raise HarnessConfigError(f"harness limit {limit} must be positive")
    manager = task_manager(include_path, tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (include path {include_path})" if include_path else " (pass --include-path for local task YAMLs)"
        raise HarnessConfigError(f"unknown harness task(s) {', '.join(unknown)}{where}")
    generating = [t for t in tasks if _output_type(manager, t) == "generate_until"]
    if generating:
        raise HarnessConfigError(f"harness task(s) {', '.join(generating)} generate text (generate_until): "
                                 "bloom-pretrain scores log-likelihoods only; run them on the export with "
                                 "lm_eval --model hf")
    return manager


def _output_type(manager, task: str) -> Optional[str]:
    """A task's output_type as its YAML states it (None for groups, or when set in an included file:
    the model then refuses generation when asked, naming the task)."""
    entry = manager.task_index.get(task)
    cfg = getattr(entry, "cfg", None)
    return cfg.get("output_type") if isinstance(cfg, dict) else None


def check_eval_tasks(cfg):
    """trainer.eval_tasks is runnable (called before a job's ranks start, and by each rank); the
    TaskManager, or None when no tasks are set."""
    settings = cfg.trainer.eval_tasks
    if not settings.tasks:
        return None
    if settings.interval < 1 or settings.batch_size < 1:
        raise HarnessConfigError(f"trainer.eval_tasks.interval={settings.interval} and batch_size="
                                 f"{settings.batch_size} must be positive")
    return check_tasks(list(settings.tasks), settings.include_path, settings.limit)


@contextlib.contextmanager
def kept_rng_state():
    """lm_eval seeds the global generators; give the caller its own back."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if saved[3] is not None:
            torch.cuda.set_rng_state_all(saved[3])


def run_tasks(lm, tasks: List[str], manager, limit=None, num_fewshot=None, log_samples=False) -> dict:
    """lm_eval's simple_evaluate on every rank; the report (the same on every rank)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import get_task_dict

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # lm_eval bootstraps stderrs in a fork()ed multiprocessing Pool; forked from a training rank
    # (gloo, DeepSpeed and data-loader threads) its workers hung. In-process is fast at 1000 draws.
    os.environ["DISABLE_MULTIPROC"] = "1"
    # Rank 0 first: the datasets cache of each task is written once, then read by the others.
    if dist.get_rank() == 0:
        get_task_dict(tasks, manager)
    dist.barrier()
    with kept_rng_state():
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, bootstrap_iters=BOOTSTRAP_ITERS,
                              log_samples=log_samples, verbosity="ERROR")
    # lm_eval returns its results only where LOCAL_RANK is 0; every rank computed the same ones.
    shared = [out]
    dist.broadcast_object_list(shared, src=0)
    out = shared[0]
    report = {"tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot,
              "max_length": lm.max_length, "scores": scores(out["results"]),
              "n_samples": {t: n.get("effective") for t, n in out.get("n-samples", {}).items()},
              "versions": {t: v for t, v in out.get("versions", {}).items()}}
    if log_samples:
        report["samples"] = sample_answers(out.get("samples", {}))
    return report


def scores(results: Dict[str, dict]) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} from lm_eval's "acc,none"-style keys (a filter other than "none" is
    kept as metric/filter; stderrs that lm_eval could not compute are left out)."""
    table = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            row[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
        table[task] = row
    return table


def sample_answers(samples: Dict[str, list]) -> Dict[str, list]:
    """Per request of each task: the document, the request's arguments and the model's answer."""
    return {task: [{"doc_id": s["doc_id"], "arguments": [list(a) for a in s["arguments"]],
                    "resps": [list(r) if isinstance(r, (list, tuple)) else [r] for r in s["resps"]]}
                   for s in rows]
            for task, rows in samples.items()}


def metric_entries(report: dict) -> Dict[str, float]:
    """metrics.jsonl keys: harness/<task>/<metric>."""
    return {f"harness/{task}/{metric}": value for task, row in report["scores"].items()
            for metric, value in row.items()}


# -- reports on disk ---------------------------------------------------------------------------------

def report_path(run_dir, iteration: int) -> Path:
    return Path(run_dir) / "harness" / f"iter_{iteration:08d}.json"


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, sort_keys=True, indent=1) + "\n")
    tmp.replace(path)


def read_report(path: Path) -> Optional[dict]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("scores"), dict) else None


def run_dir_of(checkpoint: Path) -> Optional[Path]:
    """run_dir for a checkpoint at run_dir/checkpoints/iter_X (the layout bloom-train writes)."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


# -- during training (trainer.eval_tasks) --------------------------------------------------------------

class TrainingHarness:
    """trainer.eval_tasks: every `interval` iterations, the tasks on the running model, into the
    metrics (harness/<task>/<metric>) and run_dir/harness/iter_N.json."""

    def __init__(self, cfg, engine, tokenizer_dir):
        from data.tokenizer import TokenizerInfo
        from training.evaluation.harness import BloomHarnessLM, StageForward

        settings = cfg.trainer.eval_tasks
        self.settings, self.run_dir = settings, Path(cfg.trainer.run_dir)
        self.manager = check_eval_tasks(cfg)
        self.lm = BloomHarnessLM(StageForward.of_engine(engine), TokenizerInfo(tokenizer_dir),
                                 max_length=cfg.data.seq_length, batch_size=settings.batch_size)
        self.engine = engine

    @classmethod
    def create(cls, cfg, engine, tokenizer_dir) -> Optional["TrainingHarness"]:
        return cls(cfg, engine, tokenizer_dir) if cfg.trainer.eval_tasks.tasks else None

    def maybe_run(self, iteration: int, metrics, rank0: bool, say) -> Optional[dict]:
        if iteration % self.settings.interval:
            return None
        layout = self.engine.layout
        self.engine.engine.eval()  # no dropout
        try:
            report = run_tasks(self.lm, list(self.settings.tasks), self.manager, self.settings.limit,
                               self.settings.num_fewshot)
        finally:
            self.engine.engine.train()
        report.update(iteration=iteration, layout={"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
                      source="training")
        entries = metric_entries(report)
        metrics.log(iteration, {"step": iteration, **entries})
        if rank0:
            write_report(report_path(self.run_dir, iteration), report)
        say(f"harness at iteration {iteration}: " + ", ".join(f"{k.removeprefix('harness/')} {v:.4f}"
                                                               for k, v in entries.items() if "stderr" not in k))
        return report
