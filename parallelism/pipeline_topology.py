"""DeepSpeed's pipeline topology for megatron-core's process groups, checked to agree rank by rank."""
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state


def build_topology() -> PipeModelDataParallelTopology:
    """DeepSpeed's topology for megatron's layout, checked to give every rank the same coordinates."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    check_coordinates_agree(topology)
    return topology


def check_coordinates_agree(topology: PipeModelDataParallelTopology) -> None:
    coord = topology.get_coord(dist.get_rank())
    megatron = (parallel_state.get_pipeline_model_parallel_rank(),
                parallel_state.get_data_parallel_rank(),
                parallel_state.get_tensor_model_parallel_rank())
    if (coord.pipe, coord.data, coord.model) != megatron:
        raise RuntimeError(
            f"rank {dist.get_rank()}: DeepSpeed puts it at (pp, dp, tp) = {(coord.pipe, coord.data, coord.model)} "
            f"but megatron-core at {megatron}; the two rank orders disagree")
