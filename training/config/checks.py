"""Checks that run before anything starts: each failure is one ConfigError naming the value.

Each key's own range or choices is declared beside its field (schema.py, data/config.py) and
check_declared checks them all, walking the config; the checks below relate keys to each other
(divisibility, the layout, the world size) or to the machine.

The world size comes from the environment when a launcher (torchrun, srun) started this process,
otherwise from the launcher config: nodes x processes per node.
"""
import dataclasses
import os
from typing import Mapping

from data.batch_schedule import BatchSchedule
from data.config import ALLOWED
from data.errors import DataError
from parallelism.precision_support import unsupported_reason
from parallelism.layout import Layout
from training.config.schema import PRECISIONS, ConfigError, RootConfig  # noqa: F401 (PRECISIONS: bloom-train --help)
from training.plan.hardware import load_gpu
from training.model.shapes import ffn_size, padded_vocab_size
from training.spikes import SkipRanges


def procs_per_node(cfg: RootConfig) -> int:
    launcher = cfg.launcher
    return launcher.nproc_per_node or launcher.gpus_per_node or 1


def world_size(cfg: RootConfig, env: Mapping[str, str] = os.environ) -> int:
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    return cfg.launcher.nodes * procs_per_node(cfg)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _items(key: str, value):
    """(key, item) of each value a field's declaration applies to: the value, or each item of a
    list (key[i]) or a dict (key.name)."""
    if isinstance(value, (list, tuple)):
        return [(f"{key}[{i}]", item) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return [(f"{key}.{name}", item) for name, item in value.items()]
    return [(key, value)]


def check_declared(node, prefix: str = "") -> None:
    """Every value whose field declares its allowed values (metadata=at_least(1), one_of(...), ...)
    holds one of them, nested configs included; None, an optional key left unset, is allowed."""
    for spec in dataclasses.fields(node):
        allowed = spec.metadata.get(ALLOWED)
        for key, value in _items(prefix + spec.name, getattr(node, spec.name)):
            if dataclasses.is_dataclass(value):
                check_declared(value, key + ".")
            elif allowed is not None and value is not None:
                refusal = allowed.refusal(value)
                _require(refusal is None, f"{key}={value} {refusal}")


def check_model(cfg: RootConfig) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    _require(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    _require(m.num_heads % tp == 0,
             f"model.num_heads={m.num_heads} is not divisible by parallel.tp={tp}: each rank needs whole heads")
    _require(ffn_size(m) % tp == 0,
             f"model.ffn_hidden_size={ffn_size(m)} is not divisible by parallel.tp={tp}")
    padded = padded_vocab_size(m, tp)
    _require(padded >= m.vocab_size,
             f"model.padded_vocab_size={padded} is smaller than model.vocab_size={m.vocab_size}")
    _require(padded % tp == 0,
             f"model.padded_vocab_size={padded} is not divisible by parallel.tp={tp}")


def check_layout(cfg: RootConfig, size: int) -> Layout:
    p = cfg.parallel
    _require(cfg.model.num_layers >= p.pp,
             f"model.num_layers={cfg.model.num_layers} cannot be split over parallel.pp={p.pp} stages")
    _require(size % (p.tp * p.pp) == 0,
             f"world size {size} is not a multiple of parallel.tp x parallel.pp = {p.tp} x {p.pp}")
    _require(not p.sequence_parallel or p.tp > 1,
             f"parallel.sequence_parallel=true needs parallel.tp > 1 (got tp={p.tp}): it splits the "
             "sequence over the tensor-parallel group")
    _require(not p.sequence_parallel or cfg.data.seq_length % p.tp == 0,
             f"parallel.sequence_parallel=true needs data.seq_length={cfg.data.seq_length} divisible "
             f"by parallel.tp={p.tp}")
    dp = size // (p.tp * p.pp)
    _require(p.dp is None or p.dp == dp,
             f"parallel.dp={p.dp} disagrees with world size {size} / (tp {p.tp} x pp {p.pp}) = {dp}")
    _require(cfg.trainer.precision == "fp32" or p.zero_stage >= 1,
             f"trainer.precision={cfg.trainer.precision} needs parallel.zero_stage >= 1: DeepSpeed keeps "
             "16-bit runs' fp32 master weights (and bf16's fp32 gradient accumulation) in its ZeRO optimizer")
    _require(p.pp == 1 or p.zero_stage <= 1,
             f"parallel.zero_stage={p.zero_stage} cannot be used with parallel.pp={p.pp}: "
             "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
    return Layout(p.tp, p.pp, dp)


def batch_schedule(cfg: RootConfig, dp: int) -> BatchSchedule:
    t = cfg.trainer
    _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
             f"trainer.micro_batch_size x dp = {t.micro_batch_size} x {dp}")
    _require(len(t.rampup_batch_size) in (0, 3),
             f"trainer.rampup_batch_size={t.rampup_batch_size} must be [start, increment, samples] or empty")
    rampup = tuple(t.rampup_batch_size) or None
    try:
        return BatchSchedule(t.global_batch_size, t.micro_batch_size, dp, rampup)
    except DataError as error:
        raise ConfigError(f"trainer.rampup_batch_size={t.rampup_batch_size}: {error}") from None


def check_training(cfg: RootConfig) -> None:
    t, o = cfg.trainer, cfg.optim
    _require(o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}")
    _require(t.train_iters is None or t.train_samples is None,
             "set trainer.train_iters or trainer.train_samples, not both")
    _require(t.min_loss_scale <= 2 ** t.initial_scale_power,
             f"trainer.min_loss_scale={t.min_loss_scale} must be in (0, 2^trainer.initial_scale_power]")
    spike = t.spike
    _require(spike.min_history <= spike.window,
             f"trainer.spike.min_history={spike.min_history} must be at most trainer.spike.window={spike.window}")
    SkipRanges.parse(t.skip_train_iteration_range)  # one line for a range that is not START-END
    load_gpu(cfg.launcher.gpu_type)  # one line for a GPU type the catalogue does not know


def check_precision_here(cfg: RootConfig) -> None:
    """This machine's device can train in trainer.precision; else DeepSpeed would refuse it later,
    with a traceback from deep inside its engine."""
    precision = cfg.trainer.precision
    reason = unsupported_reason(precision)
    if reason is not None:
        usable = [p for p in ("bf16", "fp16", "fp32") if p != precision and unsupported_reason(p) is None]
        raise ConfigError(f"trainer.precision={precision} is not supported on this device ({reason}); "
                          f"use {' or '.join(usable)}")


def validate(cfg: RootConfig, size: int = None, trains_here: bool = False) -> Layout:
    """Every check; returns the layout (with DP derived) the run will use.

    trains_here: this process (or the local processes it starts) will train on this machine's
    device, which must then run trainer.precision. A dry run and bloom-slurm validate for a
    cluster's GPUs, not for the machine they run on.
    """
    size = world_size(cfg) if size is None else size
    check_declared(cfg)
    check_model(cfg)
    layout = check_layout(cfg, size)
    batch_schedule(cfg, layout.dp)
    check_training(cfg)
    if trains_here:
        check_precision_here(cfg)
    return layout
