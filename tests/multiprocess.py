"""Run a function in N real processes over gloo on CPU, the way torchrun would start them.

Each worker joins a process group on its own free port and builds megatron's parallel_state
for the layout it is given; an exception in any worker fails the test with that worker's traceback.
"""
import multiprocessing
import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, layout, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import gc

    import torch

    gc.freeze()  # the fork server's preloaded frameworks: never garbage, no collection walks them
    torch.set_num_threads(1)
    from parallelism.topology import init_model_parallel, init_process_group, shutdown

    init_process_group("gloo", timeout_s=180)
    init_model_parallel(layout)
    try:
        fn(rank, *args)
    finally:
        shutdown()


# Imported once by the fork server, so each worker starts with them loaded: a fresh interpreter
# spends ~3 s of CPU per process importing this stack, most of an 8-process launch on 2 cores.
# The server itself never joins a process group, so its children start as clean as spawned ones.
PRELOAD = ["torch", "deepspeed", "megatron.core", "transformers", "training.engine.engine",
           "training.train", "training.trainer", "training.checkpoint.checkpointer"]


def _start_method() -> str:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # only read when the server starts (once per session)
    return "forkserver"


def run_processes(fn, layout, *args):
    """Call fn(rank, *args) in layout.world_size processes; fn must be importable (module level)."""
    mp.start_processes(_worker, args=(layout.world_size, free_port(), layout, fn, args),
                       nprocs=layout.world_size, join=True, start_method=_start_method())
