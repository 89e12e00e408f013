"""Training metrics: metrics.jsonl, TensorBoard and wandb, written by one rank of the job.

Every rank builds a MetricsLogger so the train loop needs no `if rank == 0`; only the writer
(is_writer=True) opens files. Layout inside the run directory (DESIGN.md, "Contracts"):

    run_dir/metrics.jsonl   one JSON object per log() call, fsync'd line by line
    run_dir/tensorboard/    TensorBoard event files
    run_dir/wandb/          wandb's files, plus `run_id` so a resumed run continues the same run

metrics.jsonl is the record of truth; TensorBoard and wandb are best-effort views: if either
cannot be imported or started, one warning is logged and training goes on without it.
"""
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

from training.config.schema import LoggingConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "run_id"

# Keys of a record that are bookkeeping, not series to plot.
_NOT_SCALARS = ("step", "time")


class MetricsLogger:
    def __init__(self, run_dir, logging_cfg: LoggingConfig, is_writer: bool,
                 config_dict: Optional[dict] = None):
        self.run_dir = Path(run_dir)
        self.cfg = logging_cfg
        self.is_writer = is_writer
        self._config_dict = config_dict or {}
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if is_writer:
            self._open()

    # ---- opening -------------------------------------------------------------------------

    def _open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        _drop_torn_tail(path)
        self._jsonl = open(path, "a", encoding="utf-8")
        if self.cfg.tensorboard:
            self._tb = _open_tensorboard(self.run_dir / TENSORBOARD_DIR)
        if self.cfg.wandb:
            self._wandb = _open_wandb(self.run_dir, self.cfg.wandb_project, self._config_dict)

    # ---- logging -------------------------------------------------------------------------

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        """Append one record for `step`; a no-op on ranks that do not write."""
        if not self.is_writer:
            return
        if self._jsonl is None:
            raise RuntimeError(f"MetricsLogger for {self.run_dir}: log() after close()")
        record = _record(step, metrics)
        self._write_line(record)
        scalars = _scalars(record)
        if self._tb is not None:
            self._log_tensorboard(step, scalars)
        if self._wandb is not None:
            self._log_wandb(step, scalars)

    def _write_line(self, record: dict) -> None:
        # One write, then flush + fsync: a SIGKILL can lose only the line being written, and
        # _drop_torn_tail removes that partial line when the run resumes.
        self._jsonl.write(json.dumps(record, default=str) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())

    def _log_tensorboard(self, step: int, scalars: Dict[str, float]) -> None:
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, global_step=step)
        # Logging happens every log_interval iterations; flushing then keeps the event file as
        # current as metrics.jsonl at no real cost.
        self._tb.flush()

    def _log_wandb(self, step: int, scalars: Dict[str, float]) -> None:
        try:
            # "step" is our x axis (define_metric in _open_wandb), not wandb's own step: wandb
            # drops any step lower than one it has seen, which a run resumed from an older
            # checkpoint would hit.
            self._wandb.log({"step": step, **scalars})
        except Exception as exc:  # a tracker failing must not stop training
            log.warning("wandb logging failed, continuing without wandb: %s", _one_line(exc))
            self._wandb = None

    # ---- resume --------------------------------------------------------------------------

    def truncate_after(self, step: int) -> int:
        """Drop records with step > `step` (a run resumed from an older checkpoint re-runs
        those steps). Atomic: the kept lines are written aside and renamed over the file.
        Returns the number of lines dropped; 0 on ranks that do not write."""
        if not self.is_writer:
            return 0
        path = self.run_dir / METRICS_FILE
        self._jsonl.close()
        try:
            dropped = _rewrite_keeping(path, lambda rec: rec["step"] <= step)
        finally:
            self._jsonl = open(path, "a", encoding="utf-8")
        if self._tb is not None:
            self._purge_tensorboard_after(step)
        if dropped and self._wandb is not None:
            self._wandb = self._fork_wandb(step)
        return dropped

    def _fork_wandb(self, step: int):
        """wandb cannot drop logged steps (rewind is a server-side feature an offline run lacks),
        so a rewound run continues in a new wandb run of the same group that first replays the
        kept metrics.jsonl records: the run being written holds each step once. The old run is
        finished with a note of where the history continues, and run_dir/wandb/run_id names the
        new one, so a later resume continues it."""
        old = self._wandb
        new_id = _store_wandb_run_id(self.run_dir, f"{_wandb_run_id(self.run_dir)[:16]}-{uuid.uuid4().hex[:6]}")
        try:
            old.summary.update({"rewound_at_step": step, "continued_in_run": new_id})
        except Exception as exc:
            log.warning("wandb summary failed: %s", _one_line(exc))
        _finish_wandb(old)
        config = {**self._config_dict, "rewound_from": {"run": old.id, "step": step}}
        new = _open_wandb(self.run_dir, self.cfg.wandb_project, config)
        if new is not None:
            for line in (self.run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                new.log({"step": record["step"], **_scalars(record)})
        return new

    def _purge_tensorboard_after(self, step: int) -> None:
        # TensorBoard hides events at or past purge_step written by earlier writers, which
        # mirrors the jsonl truncation. purge_step is only accepted when a writer opens.
        self._tb.close()
        self._tb = _open_tensorboard(self.run_dir / TENSORBOARD_DIR, purge_step=step + 1)

    # ---- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            _finish_wandb(self._wandb)
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def format_line(self, step: int, metrics: Dict[str, Any],
                    total_steps: Optional[int] = None) -> str:
        """The console line for these metrics (module-level format_line); any rank may call it."""
        return format_line(step, metrics, total_steps)


# ---- records ---------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """Python numbers for tensors and numpy scalars (so json and the trackers take them)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _record(step: int, metrics: Dict[str, Any]) -> dict:
    record = {"step": int(step), "time": time.time()}
    record.update({key: _plain(value) for key, value in metrics.items()})
    record["step"] = int(step)  # the caller's dict must not contradict the step argument
    return record


def _scalars(record: dict) -> Dict[str, float]:
    """The numeric values of a record, for TensorBoard and wandb (strings, None, lists stay
    only in metrics.jsonl)."""
    return {key: float(value) for key, value in record.items()
            if key not in _NOT_SCALARS and isinstance(value, (int, float))}


# ---- the jsonl file ---------------------------------------------------------------------------

def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line left by a kill mid-write, so the next append starts a fresh
    line instead of gluing onto (and corrupting) it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: dropped a partial last line (%d bytes) left by an interrupted write",
                path, len(data) - keep)


def _rewrite_keeping(path: Path, keep) -> int:
    """Rewrite `path` with only the lines whose parsed record satisfies `keep`; unparseable
    lines go too. Written to a temporary file in the same directory, fsync'd, then renamed."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            ok = keep(json.loads(line))
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok and line.endswith("\n"):
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return dropped


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable, not just the new file's contents.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- trackers ---------------------------------------------------------------------------------

def _one_line(exc: Exception) -> str:
    # pydantic and wandb errors span several lines; a tracker's failure gets one log line.
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _open_tensorboard(log_dir: Path, purge_step: Optional[int] = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
    except Exception as exc:
        log.warning("TensorBoard unavailable, continuing without it: %s", _one_line(exc))
        return None


def _wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id: read from run_dir/wandb/run_id, or created and stored there, so a
    resumed run (same run_dir) continues the same wandb run."""
    id_file = run_dir / WANDB_DIR / WANDB_ID_FILE
    if id_file.exists():
        stored = id_file.read_text().strip()
        if stored:
            return stored
    return _store_wandb_run_id(run_dir, uuid.uuid4().hex[:16])  # wandb's API has no id generator


def _store_wandb_run_id(run_dir: Path, run_id: str) -> str:
    id_file = run_dir / WANDB_DIR / WANDB_ID_FILE
    id_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = id_file.with_name(WANDB_ID_FILE + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, id_file)
    return run_id


def _wandb_mode() -> str:
    # An explicit WANDB_MODE (e.g. "disabled") is the user's choice; otherwise online only
    # when there is a key to log in with, so a cluster without one never blocks on a prompt.
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _open_wandb(run_dir: Path, project: str, config_dict: dict):
    try:
        import wandb
        run_id = _wandb_run_id(run_dir)
        # The group is the first run's id: a rewound run's continuation (_fork_wandb) joins it.
        run = wandb.init(project=project, dir=str(run_dir), config=config_dict, id=run_id,
                         group=run_id[:16], resume="allow", mode=_wandb_mode())
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run
    except Exception as exc:
        log.warning("wandb unavailable, continuing without it: %s", _one_line(exc))
        return None


def _finish_wandb(run) -> None:
    try:
        run.finish()
    except Exception as exc:
        log.warning("wandb finish failed: %s", _one_line(exc))


# ---- the console line -------------------------------------------------------------------------

def _count(value: float) -> str:
    """12345 -> 12.3k: throughput at a glance."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}"
    return f"{value:.1f}"


# key -> (label, format) in Megatron's order; other keys follow in the caller's order.
_LINE_FIELDS = {
    "consumed_samples": ("consumed", lambda v: f"{int(v)}"),
    "lm_loss": ("lm_loss", lambda v: f"{v:.4f}"),
    "lr": ("lr", lambda v: f"{v:.1e}"),
    "grad_norm": ("grad_norm", lambda v: f"{v:.3f}"),
    "loss_scale": ("loss_scale", lambda v: f"{v:g}"),
    "skipped": ("skipped", lambda v: f"{int(v)}"),
    "tokens_per_sec": ("tokens/s", _count),
    "samples_per_sec": ("samples/s", lambda v: f"{v:.2f}"),
    "tflops_per_device": ("TFLOPs", lambda v: f"{v:.2f}"),
}


def _format_value(key: str, value: Any) -> str:
    value = _plain(value)
    if key in _LINE_FIELDS and isinstance(value, (int, float)) and math.isfinite(value):
        return _LINE_FIELDS[key][1](value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_line(step: int, metrics: Dict[str, Any], total_steps: Optional[int] = None) -> str:
    """One Megatron-style console line: `iter 120/1000 | consumed 1920 | lm_loss 3.4100 | ...`."""
    parts = [f"iter {step}/{total_steps}" if total_steps else f"iter {step}"]
    ordered = [k for k in _LINE_FIELDS if k in metrics]
    ordered += [k for k in metrics if k not in _LINE_FIELDS and k not in _NOT_SCALARS]
    for key in ordered:
        if metrics[key] is None:
            continue
        label = _LINE_FIELDS[key][0] if key in _LINE_FIELDS else key
        parts.append(f"{label} {_format_value(key, metrics[key])}")
    return " | ".join(parts)
