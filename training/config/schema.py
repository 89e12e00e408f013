"""The typed schema of every config value: one dataclass field per value, with its default.

Hydra merges the YAML tree in `configs/` onto these dataclasses, so a misspelt or unknown key is an
error rather than a silently ignored setting. Values derived from others (padded vocab, DP size)
are computed in `checks.py`, never stored twice. Each numeric or enumerated field declares the
values it allows beside it (`metadata=at_least(1)`, `one_of(...)`: data/config.py defines them), and
checks.py's check_declared refuses any other before anything starts, in one line. The data group's
schema lives with the data pipeline (data/config.py); RootConfig below assembles the root, and
loader.py fills it from the YAML tree.
"""
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

from data.config import SEED_RANGE, DataConfig, at_least, in_range, one_of, positive, satisfies


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the value."""


# model.kernels: see training/model/kernels.py.
KERNEL_BACKENDS = ("eager", "torch", "flex", "apex", "auto")
# model.recompute: what a block recomputes in backward instead of keeping (see ModelConfig).
RECOMPUTE = ("none", "selective", "full")
# trainer.precision (16-bit needs parallel.zero_stage >= 1: checks.py)
PRECISIONS = ("fp32", "bf16", "fp16")
# optim.decay_style: see training/lr_schedule.py.
DECAY_STYLES = ("cosine", "linear", "constant")
RESUME_KEYWORDS = ("auto", "none")


def is_resume(value: str) -> bool:
    """trainer.resume: a keyword, or a directory that exists (a checkpoint, or a checkpoints
    folder whose `latest` names one)."""
    return value in RESUME_KEYWORDS or os.path.isdir(value)


def is_slurm_time(value: str) -> bool:
    """launcher.time in one of sbatch --time's forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM,
    D-HH:MM:SS, or UNLIMITED."""
    return (str(value).upper() in ("UNLIMITED", "INFINITE")
            or re.fullmatch(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}", str(value)) is not None)


@dataclass
class ModelConfig:
    name: str = "bloom-tiny"
    hidden_size: int = field(default=64, metadata=positive())
    num_layers: int = field(default=2, metadata=positive())
    num_heads: int = field(default=4, metadata=positive())
    # The tokenizer's vocabulary; the embedding is padded to a multiple of
    # pad_vocab_to_multiple_of x TP (BLOOM: 250680 -> 250880), or to padded_vocab_size if set.
    vocab_size: int = field(default=8000, metadata=positive())
    pad_vocab_to_multiple_of: int = field(default=128, metadata=positive())
    padded_vocab_size: Optional[int] = field(default=None, metadata=positive())
    # 4 x hidden_size when unset, as in BLOOM
    ffn_hidden_size: Optional[int] = field(default=None, metadata=positive())
    layer_norm_epsilon: float = field(default=1e-5, metadata=positive())
    init_std: float = field(default=0.0048, metadata=positive())
    hidden_dropout: float = field(default=0.1, metadata=in_range(0, 1, high_open=True))
    attention_dropout: float = field(default=0.1, metadata=in_range(0, 1, high_open=True))
    # eager | torch | flex | apex | auto: see training/model/kernels.py
    kernels: str = field(default="auto", metadata=one_of(*KERNEL_BACKENDS))
    # Activation recomputation (Korthikanti et al. 2022): none; selective = only the attention core
    # (scores, softmax, attention dropout) is recomputed in backward, dropping its s^2 activations;
    # full = each block keeps only its input and reruns its forward in backward.
    recompute: str = field(default="none", metadata=one_of(*RECOMPUTE))
    # The loss takes this many tokens at a time into fp32 (training/model/vocab_loss.py): its one
    # fp32 chunk is chunk x padded_vocab/TP x 4 bytes, 512 MiB at BLOOM's 250880 rows and TP1.
    loss_chunk_tokens: int = field(default=512, metadata=positive())


@dataclass
class ParallelConfig:
    tp: int = field(default=1, metadata=at_least(1))
    pp: int = field(default=1, metadata=at_least(1))
    # derived from the world size when unset; must agree when set
    dp: Optional[int] = field(default=None, metadata=at_least(1))
    zero_stage: int = field(default=1, metadata=one_of(0, 1, 2, 3))
    # Split LayerNorms, dropouts and the residual stream along the sequence over the TP group
    # (Korthikanti et al. 2022; parallelism/sequence_parallel.py). Needs tp > 1.
    sequence_parallel: bool = False
    # Run bloom-plan's winner for this model and cluster: tp, pp, dp, zero_stage, sequence_parallel,
    # trainer.micro_batch_size and model.recompute are replaced by its choice (training/plan/planner.py).
    auto: bool = False
    # DeepSpeed's ZeRO communication (training/engine/deepspeed_config.py zero_config), each passed to
    # the stages that read it. Defaults: DeepSpeed's and Megatron-DeepSpeed's (BigScience ran
    # DeepSpeed's defaults); bucket sizes count elements.
    overlap_comm: Optional[bool] = None  # None: true at ZeRO 2 and 3, false at 0 and 1
    contiguous_gradients: bool = True  # ZeRO >= 1: gradients copied into one buffer as they come
    reduce_bucket_size: int = field(default=500_000_000, metadata=positive())
    # ZeRO 1-2: updated weights all-gathered in buckets
    allgather_bucket_size: int = field(default=500_000_000, metadata=positive())
    # ZeRO 3: weights fetched ahead of their layer
    stage3_prefetch_bucket_size: int = field(default=50_000_000, metadata=at_least(0))
    # ZeRO 3: smaller weights stay whole on every rank
    stage3_param_persistence_threshold: int = field(default=100_000, metadata=at_least(0))
    # How long any collective (and the start-up rendezvous) may wait for a peer before the job fails
    # instead of hanging until the time limit: Megatron's --distributed-timeout-minutes, 10 min.
    collective_timeout_s: float = field(default=600.0, metadata=positive())


@dataclass
class OptimConfig:
    lr: float = field(default=3.0e-4, metadata=positive())
    min_lr: float = field(default=1.0e-5, metadata=at_least(0))  # and at most lr (checks.py)
    beta1: float = field(default=0.9, metadata=in_range(0, 1, high_open=True))
    beta2: float = field(default=0.95, metadata=in_range(0, 1, high_open=True))
    eps: float = field(default=1.0e-8, metadata=positive())
    weight_decay: float = field(default=0.1, metadata=at_least(0))
    clip_grad: float = field(default=1.0, metadata=at_least(0))  # 0: no clipping
    decay_style: str = field(default="cosine", metadata=one_of(*DECAY_STYLES))
    warmup_samples: int = field(default=183_105, metadata=at_least(0))
    decay_samples: int = field(default=200_000_000, metadata=at_least(0))


@dataclass
class SpikeConfig:
    """Loss-spike detection (training/spikes.py): thresholds against a window of recent steps, the
    step skipped, and a rollback after repeated spikes. Off unless enabled (a false alarm would
    change a run; turn it on for long runs, as PaLM did)."""
    enabled: bool = False
    # accepted steps whose loss and grad norm form the reference
    window: int = field(default=100, metadata=at_least(1))
    # the detector arms once the window holds this many steps (at most window: checks.py)
    min_history: int = field(default=20, metadata=at_least(1))
    # A spike: loss > mean + loss_z * std AND loss > loss_ratio * mean of the window (null: that
    # test is not made; both null: the signal is not watched). The same for the gradient norm.
    loss_z: Optional[float] = field(default=5.0, metadata=at_least(0))
    loss_ratio: Optional[float] = field(default=1.1, metadata=positive())
    grad_norm_z: Optional[float] = field(default=5.0, metadata=at_least(0))
    grad_norm_ratio: Optional[float] = field(default=3.0, metadata=positive())
    # max_spikes spikes within rollback_window iterations: reload the last checkpoint saved before
    # the first of them and skip the iterations from the first to the last (0: never roll back).
    max_spikes: int = field(default=3, metadata=at_least(0))
    rollback_window: int = field(default=100, metadata=at_least(1))
    # Fault injection, for testing the detector: at these iterations the training loss (and so
    # every gradient) is multiplied by inject_factor. Leave empty in real runs.
    inject_at: List[int] = field(default_factory=list, metadata=at_least(1))  # iterations count from 1
    inject_factor: float = field(default=10.0, metadata=positive())


@dataclass
class EvalTasksConfig:
    """trainer.eval_tasks: lm-evaluation-harness tasks on the running model every `interval`
    iterations (training/evaluation/harness_tasks.py), logged as harness/<task>/<metric>."""
    tasks: List[str] = field(default_factory=list)  # lm_eval task names; empty: none
    interval: int = field(default=1000, metadata=at_least(1))  # iterations
    include_path: Optional[str] = None  # a folder of task YAMLs (lm_eval --include_path)
    # documents per task (a fraction when < 1), as lm_eval --limit
    limit: Optional[float] = field(default=None, metadata=positive())
    num_fewshot: Optional[int] = field(default=None, metadata=at_least(0))  # None: each task's own default
    batch_size: int = field(default=8, metadata=at_least(1))  # requests per forward pass


@dataclass
class TrainerConfig:
    micro_batch_size: int = field(default=1, metadata=at_least(1))
    global_batch_size: int = field(default=8, metadata=at_least(1))
    # BLOOM's --rampup-batch-size: [start, increment, samples]; empty for none.
    rampup_batch_size: List[int] = field(default_factory=list)
    train_iters: Optional[int] = field(default=None, metadata=at_least(1))
    train_samples: Optional[int] = field(default=None, metadata=at_least(1))
    precision: str = field(default="fp32", metadata=one_of(*PRECISIONS))
    # fp16's dynamic loss scaling (DeepSpeed's scaler; BigScience's values): start at
    # 2^initial_scale_power, halve on an overflow once `hysteresis` overflows have been seen, double
    # after loss_scale_window steps without one, never below min_loss_scale. Megatron's
    # --initial-loss-scale, --hysteresis, --loss-scale-window, --min-loss-scale.
    initial_scale_power: int = field(default=12, metadata=at_least(0))
    hysteresis: int = field(default=2, metadata=at_least(1))
    loss_scale_window: int = field(default=500, metadata=at_least(1))
    # at most 2^initial_scale_power (checks.py)
    min_loss_scale: float = field(default=1.0, metadata=positive())
    seed: int = field(default=42, metadata=in_range(*SEED_RANGE))
    # iterations; a checkpoint is also saved on every exit
    save_interval: int = field(default=100, metadata=at_least(1))
    # Copy the state to host memory at the step boundary and write it while training goes on.
    async_save: bool = False
    # the newest K complete checkpoints are kept (0 = all)
    keep_checkpoints: int = field(default=3, metadata=at_least(0))
    eval_interval: int = field(default=1000, metadata=at_least(1))  # iterations
    eval_iters: int = field(default=10, metadata=at_least(0))  # batches per evaluation (0: none)
    eval_tasks: EvalTasksConfig = field(default_factory=EvalTasksConfig)
    run_dir: str = "runs/default"
    # auto: the run dir's latest checkpoint, if any | none | a checkpoint (or checkpoints) directory
    resume: str = field(default="auto", metadata=satisfies(
        "auto, none or an existing checkpoint directory", is_resume))
    dry_run: bool = False
    exit_duration_mins: Optional[float] = field(default=None, metadata=positive())
    kill_switch_file: Optional[str] = None
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    # BigScience's --skip-train-iteration-range: ["START-END", ...], inclusive, counted from 1; the
    # iterations' batches are consumed without training (rollbacks add theirs to the checkpoint).
    skip_train_iteration_range: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    log_interval: int = field(default=10, metadata=at_least(1))
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "bloom-pretrain"


@dataclass
class LauncherConfig:
    name: str = field(default="local", metadata=one_of("local", "slurm"))
    nodes: int = field(default=1, metadata=at_least(1))
    gpus_per_node: int = field(default=0, metadata=at_least(0))
    # defaults to gpus_per_node, or 1 on a CPU machine
    nproc_per_node: Optional[int] = field(default=None, metadata=at_least(1))
    # An entry of the hardware catalogue (configs/hardware/<name>.yaml) or a YAML file with its keys:
    # the one home of the GPU's memory, peak rates and bandwidths (training/plan/hardware.py).
    gpu_type: str = "cpu"
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = field(default="20:00:00", metadata=satisfies(
        "a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED)", is_slurm_time))


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
