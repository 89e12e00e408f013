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


@pytest.fixture(scope="session")
def single_process_steps(tmp_path_factory):
    """The single-process run's steps (tests/test_layout_parity.py's results at TP=PP=DP=1): the
    reference of every layout parity test, launched once per session."""
    from parallelism.topology import Layout
    from tests.test_layout_parity import results

    return results(tmp_path_factory.mktemp("single-process"), Layout(1, 1, 1))
