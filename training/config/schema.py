"""The typed schema of every config value: one dataclass field per value, with its default.

Hydra merges the YAML tree in `configs/` onto these dataclasses, so a misspelt or unknown key is an
error rather than a silently ignored setting. Values derived from others (padded vocab, DP size)
are computed in `checks.py`, never stored twice. The data group's schema lives with the
data pipeline (data/config.py); RootConfig below assembles the root, and loader.py fills it from
the YAML tree.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from data.config import DataConfig


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the value."""


# model.kernels: see training/model/kernels.py.
KERNEL_BACKENDS = ("eager", "torch", "flex", "apex", "auto")
# model.recompute: what a block recomputes in backward instead of keeping (see ModelConfig).
RECOMPUTE = ("none", "selective", "full")


@dataclass
class ModelConfig:
    name: str = "bloom-tiny"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # The tokenizer's vocabulary; the embedding is padded to a multiple of
    # pad_vocab_to_multiple_of x TP (BLOOM: 250680 -> 250880), or to padded_vocab_size if set.
    vocab_size: int = 8000
    pad_vocab_to_multiple_of: int = 128
    padded_vocab_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None  # 4 x hidden_size when unset, as in BLOOM
    layer_norm_epsilon: float = 1e-5
    init_std: float = 0.0048
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # eager | torch | flex | apex | auto: see training/model/kernels.py
    kernels: str = "auto"
    # Activation recomputation (Korthikanti et al. 2022): none; selective = only the attention core
    # (scores, softmax, attention dropout) is recomputed in backward, dropping its s^2 activations;
    # full = each block keeps only its input and reruns its forward in backward.
    recompute: str = "none"
    # The loss takes this many tokens at a time into fp32 (training/model/vocab_loss.py): its one
    # fp32 chunk is chunk x padded_vocab/TP x 4 bytes, 512 MiB at BLOOM's 250880 rows and TP1.
    loss_chunk_tokens: int = 512


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None  # derived from the world size when unset; must agree when set
    zero_stage: int = 1
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
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000  # ZeRO 1-2: updated weights all-gathered in buckets
    stage3_prefetch_bucket_size: int = 50_000_000  # ZeRO 3: weights fetched ahead of their layer
    stage3_param_persistence_threshold: int = 100_000  # ZeRO 3: smaller weights stay whole on every rank
    # How long any collective (and the start-up rendezvous) may wait for a peer before the job fails
    # instead of hanging until the time limit: Megatron's --distributed-timeout-minutes, 10 min.
    collective_timeout_s: float = 600.0


@dataclass
class OptimConfig:
    lr: float = 3.0e-4
    min_lr: float = 1.0e-5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    decay_style: str = "cosine"
    warmup_samples: int = 183_105
    decay_samples: int = 200_000_000


@dataclass
class SpikeConfig:
    """Loss-spike detection (training/spikes.py): thresholds against a window of recent steps, the
    step skipped, and a rollback after repeated spikes. Off unless enabled (a false alarm would
    change a run; turn it on for long runs, as PaLM did)."""
    enabled: bool = False
    window: int = 100  # accepted steps whose loss and grad norm form the reference
    min_history: int = 20  # the detector arms once the window holds this many steps
    # A spike: loss > mean + loss_z * std AND loss > loss_ratio * mean of the window (null: that
    # test is not made; both null: the signal is not watched). The same for the gradient norm.
    loss_z: Optional[float] = 5.0
    loss_ratio: Optional[float] = 1.1
    grad_norm_z: Optional[float] = 5.0
    grad_norm_ratio: Optional[float] = 3.0
    # max_spikes spikes within rollback_window iterations: reload the last checkpoint saved before
    # the first of them and skip the iterations from the first to the last (0: never roll back).
    max_spikes: int = 3
    rollback_window: int = 100
    # Fault injection, for testing the detector: at these iterations the training loss (and so
    # every gradient) is multiplied by inject_factor. Leave empty in real runs.
    inject_at: List[int] = field(default_factory=list)
    inject_factor: float = 10.0


@dataclass
class EvalTasksConfig:
    """trainer.eval_tasks: lm-evaluation-harness tasks on the running model every `interval`
    iterations (training/evaluation/harness_tasks.py), logged as harness/<task>/<metric>."""
    tasks: List[str] = field(default_factory=list)  # lm_eval task names; empty: none
    interval: int = 1000  # iterations
    include_path: Optional[str] = None  # a folder of task YAMLs (lm_eval --include_path)
    limit: Optional[float] = None  # documents per task (a fraction when < 1), as lm_eval --limit
    num_fewshot: Optional[int] = None  # None: each task's own default
    batch_size: int = 8  # requests per forward pass


@dataclass
class TrainerConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # BLOOM's --rampup-batch-size: [start, increment, samples]; empty for none.
    rampup_batch_size: List[int] = field(default_factory=list)
    train_iters: Optional[int] = None
    train_samples: Optional[int] = None
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # fp16's dynamic loss scaling (DeepSpeed's scaler; BigScience's values): start at
    # 2^initial_scale_power, halve on an overflow once `hysteresis` overflows have been seen, double
    # after loss_scale_window steps without one, never below min_loss_scale. Megatron's
    # --initial-loss-scale, --hysteresis, --loss-scale-window, --min-loss-scale.
    initial_scale_power: int = 12
    hysteresis: int = 2
    loss_scale_window: int = 500
    min_loss_scale: float = 1.0
    seed: int = 42
    save_interval: int = 100  # iterations; a checkpoint is also saved on every exit
    # Copy the state to host memory at the step boundary and write it while training goes on.
    async_save: bool = False
    keep_checkpoints: int = 3  # the newest K complete checkpoints are kept (0 = all)
    eval_interval: int = 1000
    eval_iters: int = 10
    eval_tasks: EvalTasksConfig = field(default_factory=EvalTasksConfig)
    run_dir: str = "runs/default"
    resume: str = "auto"  # auto | none | a checkpoint directory
    dry_run: bool = False
    exit_duration_mins: Optional[float] = None
    kill_switch_file: Optional[str] = None
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    # BigScience's --skip-train-iteration-range: ["START-END", ...], inclusive, counted from 1; the
    # iterations' batches are consumed without training (rollbacks add theirs to the checkpoint).
    skip_train_iteration_range: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "bloom-pretrain"


@dataclass
class LauncherConfig:
    name: str = "local"  # local | slurm
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: Optional[int] = None  # defaults to gpus_per_node, or 1 on a CPU machine
    # An entry of the hardware catalogue (configs/hardware/<name>.yaml) or a YAML file with its keys:
    # the one home of the GPU's memory, peak rates and bandwidths (training/plan/hardware.py).
    gpu_type: str = "cpu"
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "20:00:00"


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
