"""Checks that run before anything starts: each failure is one ConfigError naming the value.

The world size comes from the environment when a launcher (torchrun, srun) started this process,
otherwise from the launcher config: nodes x processes per node.
"""
import os
from typing import Mapping


from data.batch_schedule import BatchSchedule
from data.errors import DataError
from parallelism.precision_support import unsupported_reason
from parallelism.layout import Layout
from training.config.schema import KERNEL_BACKENDS, RECOMPUTE, ConfigError, RootConfig
from training.plan.hardware import load_gpu
from training.model.shapes import ffn_size, padded_vocab_size

PRECISIONS = ("fp32", "bf16", "fp16")
DECAY_STYLES = ("cosine", "linear", "constant")


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


def check_model(cfg: RootConfig) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    for key in ("hidden_size", "num_layers", "num_heads", "vocab_size", "pad_vocab_to_multiple_of",
                "loss_chunk_tokens"):
        _require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
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
    _require(m.kernels in KERNEL_BACKENDS, f"model.kernels={m.kernels} is not one of {', '.join(KERNEL_BACKENDS)}")
    _require(m.recompute in RECOMPUTE, f"model.recompute={m.recompute} is not one of {', '.join(RECOMPUTE)}")
    for key in ("hidden_dropout", "attention_dropout"):
        _require(0.0 <= getattr(m, key) < 1.0, f"model.{key}={getattr(m, key)} must be in [0, 1)")


def check_layout(cfg: RootConfig, size: int) -> Layout:
    p = cfg.parallel
    for key in ("tp", "pp"):
        _require(getattr(p, key) >= 1, f"parallel.{key}={getattr(p, key)} must be at least 1")
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
    _require(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        _require(getattr(p, key) > 0, f"parallel.{key}={getattr(p, key)} must be positive")
    for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        _require(getattr(p, key) >= 0, f"parallel.{key}={getattr(p, key)} must not be negative")
    _require(p.collective_timeout_s > 0, f"parallel.collective_timeout_s={p.collective_timeout_s} must be positive")
    _require(cfg.trainer.precision == "fp32" or p.zero_stage >= 1,
             f"trainer.precision={cfg.trainer.precision} needs parallel.zero_stage >= 1: DeepSpeed keeps "
             "16-bit runs' fp32 master weights (and bf16's fp32 gradient accumulation) in its ZeRO optimizer")
    _require(p.pp == 1 or p.zero_stage <= 1,
             f"parallel.zero_stage={p.zero_stage} cannot be used with parallel.pp={p.pp}: "
             "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
    return Layout(p.tp, p.pp, dp)


def batch_schedule(cfg: RootConfig, dp: int) -> BatchSchedule:
    t = cfg.trainer
    _require(t.micro_batch_size >= 1, f"trainer.micro_batch_size={t.micro_batch_size} must be at least 1")
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
    _require(t.precision in PRECISIONS, f"trainer.precision={t.precision} is not one of {', '.join(PRECISIONS)}")
    _require(o.decay_style in DECAY_STYLES,
             f"optim.decay_style={o.decay_style} is not one of {', '.join(DECAY_STYLES)}")
    _require(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}")
    _require(t.train_iters is None or t.train_samples is None,
             "set trainer.train_iters or trainer.train_samples, not both")
    _require(cfg.data.seq_length >= 1, f"data.seq_length={cfg.data.seq_length} must be positive")
    _require(cfg.launcher.nodes >= 1, f"launcher.nodes={cfg.launcher.nodes} must be at least 1")
    load_gpu(cfg.launcher.gpu_type)  # one line for a GPU type the catalogue does not know
    check_loss_scaler(t)


def check_loss_scaler(t) -> None:
    _require(t.initial_scale_power >= 0, f"trainer.initial_scale_power={t.initial_scale_power} must not be negative")
    _require(t.loss_scale_window >= 1, f"trainer.loss_scale_window={t.loss_scale_window} must be at least 1")
    _require(t.hysteresis >= 1, f"trainer.hysteresis={t.hysteresis} must be at least 1")
    _require(0 < t.min_loss_scale <= 2 ** t.initial_scale_power,
             f"trainer.min_loss_scale={t.min_loss_scale} must be in (0, 2^trainer.initial_scale_power]")


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
    check_model(cfg)
    layout = check_layout(cfg, size)
    batch_schedule(cfg, layout.dp)
    check_training(cfg)
    if trains_here:
        check_precision_here(cfg)
    return layout
