"""What a tensor-parallel layer needs to know about its rank, in one object passed to the model."""
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig

from parallelism.tp_rng import TensorParallelRNG


@dataclass
class TensorParallel:
    rank: int
    size: int
    rng: TensorParallelRNG
    megatron_config: ModelParallelConfig
    # Activations outside the TP matmuls split along the sequence (parallelism/sequence_parallel.py).
    # megatron's config keeps sequence_parallel=False: its SP buffers are CUDA-only; ours are not.
    sequence_parallel: bool = False


def tensor_parallel_from_state(seed: int, device, params_dtype=torch.float32,
                               initialize: bool = True, sequence_parallel: bool = False) -> TensorParallel:
    """The TP context of this process, read from an initialised megatron parallel_state.

    Weights are always initialised on the CPU from one full master tensor per parameter, then
    split (megatron's use_cpu_initialization): the same seed gives the same full model at any TP
    size, which is what makes layouts comparable step for step.
    """
    size = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    config = ModelParallelConfig(
        tensor_model_parallel_size=size,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        perform_initialization=initialize,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # megatron insists when PP > 1; DeepSpeed moves the tensors
        gradient_accumulation_fusion=False,
    )
    rng = TensorParallelRNG(seed, rank, torch.device(device))
    return TensorParallel(rank, size, rng, config, sequence_parallel)
