import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def single_process():
    """A one-process group with megatron's parallel_state at TP=PP=DP=1."""
    from parallelism.topology import Layout, init_model_parallel, init_process_group, shutdown

    init_process_group("gloo")
    init_model_parallel(Layout(1, 1, 1))
    yield
    shutdown()
