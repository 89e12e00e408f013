"""DeepSpeed's JSON config derived from ours, and the hooks DeepSpeed's engine needs around
megatron-core (its MPU interface, its comm layer's CPU start)."""
import deepspeed
from megatron.core import parallel_state

from parallelism.topology import Layout


class MegatronMPU:
    """megatron-core's parallel_state under the names DeepSpeed's engine asks for (PP = 1)."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)


def zero_config(parallel) -> dict:
    """DeepSpeed's zero_optimization section: the stage, and the communication settings that stage
    reads (parallel.* in configs/parallel/default.yaml; bucket sizes in elements)."""
    stage = parallel.zero_stage
    # Gradients reduced in buckets during backward, overlapped with it: at ZeRO 2 and 3 (DeepSpeed's
    # own default at 3). Below, the reduction waits for the accumulation boundary, as BigScience ran.
    overlap = parallel.overlap_comm if parallel.overlap_comm is not None else stage >= 2
    config = {"stage": stage, "reduce_bucket_size": parallel.reduce_bucket_size}  # ZeRO 0's all-reduce too
    if stage >= 1:
        config.update(overlap_comm=overlap, contiguous_gradients=parallel.contiguous_gradients)
    if stage in (1, 2):
        config["allgather_bucket_size"] = parallel.allgather_bucket_size
    if stage == 3:
        config.update(stage3_prefetch_bucket_size=parallel.stage3_prefetch_bucket_size,
                      stage3_param_persistence_threshold=parallel.stage3_param_persistence_threshold)
    return config


def deepspeed_config(cfg, layout: Layout, initial_global_batch: int) -> dict:
    """DeepSpeed's JSON config, derived from ours (never written by hand)."""
    t = cfg.trainer
    config = {
        "train_batch_size": initial_global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": initial_global_batch // (t.micro_batch_size * layout.dp),
        # ZeRO 0 (fp32 only): BloomEngine measures and clips the gradients itself (see
        # _clip_in_optimizer_step); DeepSpeed's ZeRO optimizers do it right from their partitions.
        "gradient_clipping": cfg.optim.clip_grad if cfg.parallel.zero_stage > 0 else 0.0,
        "zero_optimization": zero_config(cfg.parallel),
        "zero_allow_untested_optimizer": True,  # our AdamW subclass (GuardedAdamW)
        "steps_per_print": 2 ** 31,  # the train loop logs
        "wall_clock_breakdown": False,
        "bf16": {"enabled": t.precision == "bf16"},
        # loss_scale 0: dynamic scaling, with the trainer's settings.
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": t.initial_scale_power, "loss_scale_window": t.loss_scale_window,
                 "hysteresis": t.hysteresis, "min_loss_scale": t.min_loss_scale},
    }
    if t.precision == "bf16":
        # BLOOM-176B's recipe; DeepSpeed's pipeline + ZeRO-1 in bf16 fails without it.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg.parallel.sequence_parallel:
        # DeepSpeed's pipeline sends each TP rank 1/TP of an activation and all-gathers it on the
        # next stage, assuming TP ranks hold the same activation; under sequence parallelism each
        # holds its own slice of the sequence, which must travel whole.
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return config


def skip_shared_memory_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce when its comm layer starts.

    DeepSpeed's TorchBackend builds that C++ op (ShareMemCommBuilder) on every CPU start, one
    process included: 21-60 s on a machine with an empty torch extension cache, the largest part of
    the demo's time to its first step. Only `inference_all_reduce` (DeepSpeed-Inference's AutoTP)
    calls it; training's collectives, ours and DeepSpeed's engine's, go through torch.distributed.
    Marking the op incompatible is the switch DeepSpeed itself reads (`deepspeed.ops.__compatible_ops__`,
    probed once per process and kept, so the edit persists), and the backend then starts without it.
    """
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
