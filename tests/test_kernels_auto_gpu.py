"""On CUDA, model.kernels=auto must pick the fastest ALiBi attention present, with and without
attention dropout: every backend that can run is timed (forward + backward, bf16, a bloom-1b7
shaped layer at sequence 2048) and auto's choice must be within 10% of the fastest.

Skipped without CUDA (the rule only matters there; on CPU auto is `torch`, whose speed
benchmarks/bench_vs_hf.py measures). Never run on these CPU-only machines: written for the first
GPU machine at hand (benchmarks/gpu_check.sh runs the GPU tests).
"""
import pytest
import torch

from training.model.alibi import alibi_slopes_for_rank
from training.model.kernels import KernelUnavailable, available_backends, select_kernels

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs CUDA: times the attention backends on the GPU")

BATCH, HEADS, SEQ, HEAD_DIM = 2, 16, 2048, 128  # bloom-1b7 at TP1
SLOWER_BY_AT_MOST = 1.10


def _inputs(device):
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, device=device, dtype=torch.bfloat16,
                           generator=generator).requires_grad_() for _ in range(3))
    return q, k, v, alibi_slopes_for_rank(HEADS, 0, 1).to(device)


def _milliseconds(attention, inputs, dropout: float, iterations: int = 10) -> float:
    q, k, v, slopes = inputs
    grad = torch.randn_like(q)

    def step():
        attention(q, k, v, slopes, dropout).backward(grad)

    for _ in range(3):  # compiles (flex), autotunes, fills the allocator's cache
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iterations):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def _runnable(device, dropout: float) -> dict:
    """Each distinct attention function a backend that can run here would use."""
    found = {}
    for name in available_backends(device):
        try:
            kernels = select_kernels(name, device, dropout)
        except KernelUnavailable:  # flex with dropout
            continue
        found.setdefault(kernels.attention, name)
    return found


@requires_cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_auto_picks_the_fastest_attention(dropout):
    device = torch.device("cuda")
    inputs = _inputs(device)
    times = {attention: _milliseconds(attention, inputs, dropout) for attention in _runnable(device, dropout)}
    names = {_runnable(device, dropout)[a]: round(ms, 3) for a, ms in times.items()}
    chosen = select_kernels("auto", device, dropout).attention
    assert chosen in times, f"auto chose an attention no runnable backend has: {names}"
    assert times[chosen] <= SLOWER_BY_AT_MOST * min(times.values()), \
        f"auto chose {_runnable(device, dropout)[chosen]} at {times[chosen]:.3f} ms; all (ms): {names}"
