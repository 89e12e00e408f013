"""The train loop: data, engine, LR schedule, batch rampup, evaluation, guards, metrics.

Every rank runs a Trainer (training/train.py's run() builds it); only global rank 0 prints and
writes metrics.
"""
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data.data_report import write_data_report
from data.datasets import build_datasets
from data.sampler import build_eval_loader, iter_global_batches
from parallelism.tp_replicas import sync_replicated_parameters
from training import exit_record
from training.checkpoint.checkpointer import Checkpointer
from training.config.checks import batch_schedule
from training.engine.engine import BloomEngine
from training.evaluation.harness_tasks import TrainingHarness
from training.guards import NonFiniteGuard, TrainingStopped
from training.lr_schedule import learning_rate
from training.metrics import MetricsLogger
from training.model.shapes import padded_vocab_size
from training.plan.flops import model_flops_per_iteration, tflops_per_device
from training.spikes import SkipRanges, SpikeDetector


@dataclass
class LoopState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    history: list = field(default_factory=list)  # (iteration, lm_loss) of every step run
    spikes: dict = field(default_factory=dict)  # the spike state a checkpoint saves (Trainer.save)


def total_train_samples(cfg, schedule) -> int:
    if cfg.trainer.train_samples is not None:
        return cfg.trainer.train_samples
    consumed = 0
    for _ in range(cfg.trainer.train_iters or 0):
        consumed += schedule.global_batch(consumed)
    return consumed


def build_run_data(cfg, schedule):
    """The run's datasets, sized for every sample its training and evaluations will read (their
    sample order depends on the sizes asked for, so a test rebuilding a run's batches calls this)."""
    train = total_train_samples(cfg, schedule)
    evals = (train // (cfg.trainer.eval_interval * cfg.trainer.global_batch_size) + 1)
    valid = evals * cfg.trainer.eval_iters * cfg.trainer.global_batch_size
    return build_datasets(cfg.data, train, valid_samples=valid)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Megatron's seeding: the same seed on every TP and DP rank (hidden dropout must agree
    across TP), offset by pipeline stage."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg, layout):
        self.cfg, self.layout = cfg, layout
        # Checked first: a bad range or threshold fails before any data or model is built.
        self.spikes = SpikeDetector(cfg.trainer.spike)
        self.skips = SkipRanges.parse(cfg.trainer.skip_train_iteration_range)
        self.rollbacks = []  # {"at", "to", "skip"} of each rollback, saved with the skip ranges
        self.rank0 = dist.get_rank() == 0
        self.device = device_for_rank()
        self.schedule = batch_schedule(cfg, layout.dp)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.data = build_run_data(cfg, self.schedule)
        if self.rank0:  # what each split blends and what was left out, beside the run's results
            Path(cfg.trainer.run_dir).mkdir(parents=True, exist_ok=True)
            write_data_report(Path(cfg.trainer.run_dir) / "data.json", self.data)
        self.engine = BloomEngine(cfg, layout, self.schedule.global_batch(0), self.device)
        seed_everything(cfg.trainer.seed)
        self.state = LoopState()
        run_dir = Path(cfg.trainer.run_dir)
        self.metrics = MetricsLogger(run_dir, cfg.logging, self.rank0, config_dict=_config_dict(cfg))
        self.start_time = time.time()
        self.guard = NonFiniteGuard()
        if cfg.trainer.spike.enabled:
            self.engine.step_gate = self.spikes.check
        self.checkpointer = Checkpointer(cfg, layout, self.engine, self.data.tokenizer.directory)
        # trainer.eval_tasks: lm-evaluation-harness tasks on the running model (None when unset)
        self.harness = TrainingHarness.create(cfg, self.engine, self.data.tokenizer.directory)
        self.saved_at = None
        self.signal_received = None
        self.exit_reason = None  # set when the loop ends: finished, or one of exit_record.EARLY_STOPS
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)
        self._resume()
        self.start_iteration = self.state.iteration

    def _on_signal(self, signum, _frame) -> None:
        # Only note it: the loop saves and exits at the next step boundary, all ranks together.
        self.signal_received = signum

    def _resume(self) -> None:
        restored = self.checkpointer.restore(self.cfg.trainer.resume, self._say)
        if restored is None:
            # The run starts at step 0: what an earlier start logged before it died with no
            # checkpoint would otherwise stay, and metrics.jsonl would hold those steps twice.
            dropped = self.metrics.truncate_after(0)
            if dropped:
                self._say(f"no checkpoint to resume from: dropped {dropped} metrics lines an earlier start logged")
            return
        directory, saved = restored
        self._restore_position(saved)
        s = self.state
        if not saved["same_layout"]:
            seed_everything(self.cfg.trainer.seed + s.iteration)  # the saved streams belong to other ranks
        dropped = self.metrics.truncate_after(s.iteration)
        self._say(f"resumed from {directory} at iteration {s.iteration}, {s.consumed_samples} samples"
                  + ("" if saved["same_layout"] else " (new layout: weights and optimizer state reshaped)")
                  + _read_summary(saved)
                  + (f"; dropped {dropped} metrics lines logged after it" if dropped else ""))

    def _restore_position(self, saved: dict) -> None:
        """The loop position and spike state a checkpoint holds (one without spike state: none;
        the configured skip ranges are kept, merged with the saved ones)."""
        s = self.state
        s.iteration, s.consumed_samples = saved["iteration"], saved["consumed_samples"]
        s.consumed_tokens = saved["consumed_tokens"]
        s.history = [(i, loss) for i, loss in s.history if i <= s.iteration]
        self.saved_at = s.iteration
        spikes = saved.get("spikes") or {}
        self.spikes.load_state_dict(spikes.get("detector"))
        for start, end in spikes.get("skip_ranges", []):
            self.skips.add(start, end)
        self.rollbacks = _merged(self.rollbacks, spikes.get("rollbacks", []))

    def save(self) -> None:
        if self.saved_at != self.state.iteration:
            self.state.spikes = {"detector": self.spikes.state_dict(), "skip_ranges": self.skips.to_list(),
                                 "rollbacks": list(self.rollbacks)}
            path = self.checkpointer.save(self.state)
            self.saved_at = self.state.iteration
            if self.cfg.trainer.async_save:
                self._say(f"checkpoint of iteration {self.state.iteration}: writing in the background")
            else:
                self._say(f"saved checkpoint {path}")

    def _finish_background_save(self, wait: bool = False) -> None:
        path = self.checkpointer.wait() if wait else self.checkpointer.poll()
        if path is not None and self.cfg.trainer.async_save:
            self._say(f"saved checkpoint {path}")

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> LoopState:
        t = self.cfg.trainer
        self._say(f"training {self.cfg.model.name}: TP {self.layout.tp} x PP {self.layout.pp} x DP "
                  f"{self.layout.dp}, {t.precision}, {self._target()}")
        # The batches start from the data position; a skipped range or a rollback moves it, and
        # they start again from there.
        while not self._done() and (self._skip_range() or self._train_batches()):
            pass
        if self.state.iteration > 0:
            self.save()
        self._finish_background_save(wait=True)  # the exit waits for the write
        self.exit_reason = self.exit_reason or "finished"
        return self.state

    def _train_batches(self) -> bool:
        """Train from the current data position; True when it must jump (a skip range is next,
        or a rollback happened), False when training is over."""
        t = self.cfg.trainer
        batches = iter_global_batches(self.data.train, self.schedule, self.state.consumed_samples,
                                      self.dp_rank, self.cfg.data.loader_workers)
        window = time.time()
        for consumed, micro_batches in batches:
            if self._done():
                return False
            if self.skips.end_of(self.state.iteration + 1) is not None:
                return True
            result = self._step(micro_batches)
            self._finish_background_save()
            self._log_step(result, time.time() - window, len(micro_batches))
            window = time.time()
            if result.spike and self._roll_back_if_due():
                return True
            if self.state.iteration % t.eval_interval == 0:
                self.evaluate()
            if self.harness:
                self.harness.maybe_run(self.state.iteration, self.metrics, self.rank0, self._say)
            if self.state.iteration % t.save_interval == 0:
                self.save()
            if self._should_exit():
                return False
        return False

    def _skip_range(self) -> bool:
        """If the next iteration is in a skip range, consume the range's global batches untrained
        (their iterations and samples count, as the data sampler reads by position); True then."""
        s, t = self.state, self.cfg.trainer
        end = self.skips.end_of(s.iteration + 1)
        if end is None:
            return False
        first, samples = s.iteration + 1, s.consumed_samples
        while s.iteration < end and not self._done():
            size = self._advance()
            self.metrics.log(s.iteration, {"step": s.iteration, "skipped": True, "data_skipped": True,
                                           "global_batch_size": size, "consumed_samples": s.consumed_samples,
                                           "consumed_tokens": s.consumed_tokens})
        self._say(f"iterations {first}-{s.iteration} skipped (trainer.skip_train_iteration_range): "
                  f"their {s.consumed_samples - samples} samples consumed untrained")
        if s.iteration // t.save_interval > (first - 1) // t.save_interval:
            self.save()  # a save point fell inside the range
        return True

    def _roll_back_if_due(self) -> bool:
        """After a spike: when max_spikes fell within the rollback window, reload the last
        checkpoint saved before the first of them (after any save in flight), and skip the
        iterations from the first spike to this one. True when it rolled back."""
        span = self.spikes.rollback_range(self.state.iteration)
        if span is None:
            return False
        first, last = span
        count = len(self.spikes.spikes)
        self._finish_background_save(wait=True)
        target = self.checkpointer.roll_back_before(first)
        if target is None:
            raise TrainingStopped(
                f"{count} loss spikes in iterations {first}-{last} and no checkpoint saved before iteration "
                f"{first} to roll back to: restart from an earlier checkpoint with "
                f"trainer.skip_train_iteration_range=[\"{first}-{last}\"]")
        skips_before = self.skips.to_list()
        _, saved = self.checkpointer.restore(str(target), self._say)
        self._restore_position(saved)
        for start, end in skips_before + [[first, last]]:
            self.skips.add(start, end)
        event = {"at": last, "to": self.state.iteration, "skip": [first, last]}
        self.rollbacks = _merged(self.rollbacks, [event])
        self.metrics.log(last, {"step": last, "rollback": event, "spike_iterations": count})
        self._say(f"iteration {last}: {count} loss spikes since iteration {first}: rolled back to {target} "
                  f"(iteration {self.state.iteration}); iterations {first}-{last} will be skipped")
        return True

    def _target(self) -> str:
        t = self.cfg.trainer
        return f"{t.train_iters} iterations" if t.train_iters is not None else f"{t.train_samples} samples"

    def _done(self) -> bool:
        t, s = self.cfg.trainer, self.state
        if t.train_iters is not None:
            return s.iteration >= t.train_iters
        return t.train_samples is not None and s.consumed_samples >= t.train_samples

    def _step(self, micro_batches):
        s = self.state
        lr = learning_rate(self.cfg.optim, s.consumed_samples)
        self.engine.set_learning_rate(lr)
        spike = self.cfg.trainer.spike
        self.engine.loss_factor = spike.inject_factor if s.iteration + 1 in spike.inject_at else 1.0
        result = self.engine.train_step(micro_batches)
        size = self._advance()
        s.history.append((s.iteration, result.loss))
        self._check_finite(result)
        self._note_spike(result)
        result.lr, result.global_batch = lr, size
        return result

    def _advance(self) -> int:
        """Move the loop position past one global batch (trained or skipped); returns its size."""
        s = self.state
        size = self.schedule.global_batch(s.consumed_samples)
        s.iteration += 1
        s.consumed_samples += size
        s.consumed_tokens += size * self.cfg.data.seq_length
        return size

    def _check_finite(self, result) -> None:
        message = self.guard.update(self.state.iteration, result.loss, result.grad_norm,
                                    result.skipped and not result.spike, result.overflow)
        if message:
            self._say(message)

    def _note_spike(self, result) -> None:
        """Feed the detector the step every rank agreed on, and say why a spike was one."""
        self.spikes.record(self.state.iteration, result.loss, result.grad_norm, result.spike, not result.skipped)
        if result.spike:
            why = self.spikes.check(result.loss, result.grad_norm) if self.rank0 else None
            self._say(f"iteration {self.state.iteration}: loss spike ({why or 'seen by another rank'}): "
                      "step skipped, weights unchanged")

    def _log_step(self, result, seconds: float, micro_batches: int) -> None:
        s, cfg = self.state, self.cfg
        seq = cfg.data.seq_length
        flops = model_flops_per_iteration(cfg.model, padded_vocab_size(cfg.model, self.layout.tp),
                                          result.global_batch, seq, cfg.model.recompute == "full")
        metrics = {
            "step": s.iteration, "lm_loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "loss_scale": result.loss_scale, "skipped": result.skipped, "overflow": result.overflow,
            "spike": result.spike,
            "global_batch_size": result.global_batch, "consumed_samples": s.consumed_samples,
            "consumed_tokens": s.consumed_tokens, "iteration_time": seconds,
            "samples_per_sec": result.global_batch / seconds,
            "tokens_per_sec": result.global_batch * seq / seconds,
            "tflops_per_device": tflops_per_device(flops, seconds, self.layout.world_size),
        }
        if s.iteration % cfg.logging.log_interval == 0 or s.iteration == 1:
            metrics["tp_replica_drift"] = sync_replicated_parameters(self.engine.module)
            if metrics["tp_replica_drift"] > 0:
                self._say(f"iteration {s.iteration}: replicated parameters drifted by "
                          f"{metrics['tp_replica_drift']:.3g} across TP ranks; re-synced from TP rank 0")
        self.metrics.log(s.iteration, metrics)
        if self.rank0 and (s.iteration % cfg.logging.log_interval == 0 or s.iteration == 1):
            print(self.metrics.format_line(s.iteration, metrics, cfg.trainer.train_iters), flush=True)

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Validation loss on the blend and on each language's own validation set."""
        mbs, iters = self.cfg.trainer.micro_batch_size, self.cfg.trainer.eval_iters
        sets = {"valid": self.data.valid, **{f"valid/{k}": v for k, v in self.data.valid_per_dataset.items()}}
        results = {}
        for name, dataset in sets.items():
            if dataset is None:
                continue
            loader = build_eval_loader(dataset, mbs, self.dp_rank, self.layout.dp)
            micro = [b for _, b in zip(range(iters), loader)]
            if micro:
                results[f"{name}_loss"] = self.engine.eval_loss(micro)
        if results:
            self.metrics.log(self.state.iteration, {"step": self.state.iteration, **results})
            languages = {k: v for k, v in results.items() if k.startswith("valid/")}
            self._say(f"eval at iteration {self.state.iteration}: valid_loss {results.get('valid_loss', float('nan')):.4f}"
                      + (f" ({len(languages)} languages, min {min(languages.values()):.3f}, "
                         f"max {max(languages.values()):.3f})" if languages else ""))
        return results

    # -- exits ------------------------------------------------------------------------------

    def _should_exit(self) -> bool:
        t = self.cfg.trainer
        reasons = []
        if t.exit_duration_mins is not None and time.time() - self.start_time > 60 * t.exit_duration_mins:
            reasons.append("time_budget")
        if self.signal_received is not None:
            reasons.append(signal.Signals(self.signal_received).name)
        if t.kill_switch_file and os.path.exists(t.kill_switch_file):
            reasons.append("kill_switch")
        # Every rank must leave together: agree on the strongest reason (0: none).
        flag = max((1 + exit_record.EARLY_STOPS.index(r) for r in reasons), default=0)
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        if value.item() == 0:
            return False
        self.exit_reason = exit_record.EARLY_STOPS[int(value.item()) - 1]
        why = {"time_budget": f"wall-clock budget of {t.exit_duration_mins} min reached",
               "kill_switch": f"kill switch {t.kill_switch_file} found"}
        self._say(f"stopping at iteration {self.state.iteration}: "
                  + why.get(self.exit_reason, f"signal received ({self.exit_reason})"))
        return True

    def _say(self, line: str) -> None:
        if self.rank0:
            print(line, flush=True)

    def close(self) -> None:
        self.metrics.close()


def _merged(events: list, more: list) -> list:
    """Rollback records, each once, in order of iteration (a checkpoint's and the run's own)."""
    unique = {json.dumps(e, sort_keys=True): e for e in [*events, *more]}
    return sorted(unique.values(), key=lambda e: (e["at"], e["to"]))


def _config_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _read_summary(saved: dict) -> str:
    """What rank 0 read of the checkpoint (format 2): its own part, not the whole."""
    read = saved.get("bytes_read", {})
    if not read.get("load"):
        return ""
    return (f"; rank 0 read {read['load'] / 2**20:.1f} MB of tensors (and verified "
            f"{read['verify'] / 2**20:.1f} MB) of the checkpoint's {saved['tensor_bytes'] / 2**20:.1f} MB")
