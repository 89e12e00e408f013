"""The chunked vocab-parallel loss (training/model/vocab_loss.py) against megatron-core's unchunked
vocab_parallel_cross_entropy: the same loss and logits gradient (1e-6) at TP1 and TP2, and through
the whole model the same parameter gradients; its peak memory (torch's CPU memory profiler) is one
fp32 chunk where megatron's is a whole fp32 copy of the logits."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core import tensor_parallel as mtp
from torch.profiler import ProfilerActivity, profile

from parallelism.topology import Layout
from tests.multiprocess import run_processes
from training.config.schema import ModelConfig
from training.model.bloom import build_model
from training.model.vocab_loss import chunked_vocab_parallel_cross_entropy

VOCAB, BATCH, SEQ = 512, 2, 24
ATOL = 1e-6


def full_logits_and_labels(dtype):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(BATCH, SEQ, VOCAB, generator=generator) * 3
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    weights = torch.rand(BATCH, SEQ, generator=generator)  # a different gradient per token
    return logits.to(dtype), labels, weights


def rank_slice(full: torch.Tensor) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full.chunk(tp, dim=-1)[rank].contiguous()


def loss_and_grad(loss_fn, logits, labels, weights):
    """Per-token losses and d(sum of weights x losses)/d logits; the logits enter as a non-leaf
    (as the model's do), so the chunked loss may overwrite them with their gradient."""
    leaf = logits.clone().requires_grad_()
    losses = loss_fn(leaf * 1, labels)
    (losses * weights).sum().backward()
    return losses.detach(), leaf.grad.float()


def megatron_unchunked(logits, labels):
    return mtp.vocab_parallel_cross_entropy(logits.float(), labels)


def check_against_unchunked(chunk: int, dtype) -> None:
    full, labels, weights = full_logits_and_labels(dtype)
    mine = loss_and_grad(lambda x, y: chunked_vocab_parallel_cross_entropy(x, y, chunk),
                         rank_slice(full), labels, weights)
    theirs = loss_and_grad(megatron_unchunked, rank_slice(full), labels, weights)
    torch.testing.assert_close(mine[0], theirs[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mine[1], theirs[1], atol=ATOL, rtol=0)
    if dtype == torch.float32:  # and torch's cross entropy on the whole vocabulary, in one process
        reference = loss_and_grad(lambda x, y: F.cross_entropy(x.transpose(1, 2), y, reduction="none"),
                                  full, labels, weights)
        torch.testing.assert_close(mine[0], reference[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(mine[1], rank_slice(reference[1]), atol=ATOL, rtol=0)


MODEL = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=256, init_std=0.05,
                    hidden_dropout=0.0, attention_dropout=0.0, kernels="eager")


def model_grads(chunk):
    """Parameter gradients of a masked mean loss, chunked, or (chunk None) with megatron's loss."""
    model = build_model(dataclasses.replace(MODEL, loss_chunk_tokens=chunk or 1), seed=5)
    generator = torch.Generator().manual_seed(3)
    tokens, labels = (torch.randint(0, 256, (2, 16), generator=generator) for _ in range(2))
    mask = (torch.rand(2, 16, generator=generator) > 0.3).float()
    if chunk:
        loss = model.loss(tokens, labels, mask)
    else:
        losses = megatron_unchunked(model(tokens), labels)
        loss = (losses * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def check_model_against_unchunked() -> None:
    loss, grads = model_grads(chunk=5)
    ref_loss, ref_grads = model_grads(chunk=None)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=0, msg=name)


CHUNKS = [1, 7, BATCH * SEQ, 10 ** 6]  # one token, uneven, exactly all, more than all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_equals_unchunked_tp1(single_process, chunk, dtype):
    check_against_unchunked(chunk, dtype)


def test_model_gradients_equal_unchunked_tp1(single_process):
    check_model_against_unchunked()


def _tp2_worker(rank):
    for chunk in CHUNKS:
        for dtype in (torch.float32, torch.bfloat16):
            check_against_unchunked(chunk, dtype)
    check_model_against_unchunked()


def test_chunked_equals_unchunked_tp2():
    """Real TP2 over gloo: the max, target logit and sum of exponentials are reduced per chunk."""
    run_processes(_tp2_worker, Layout(2, 1, 1))


def peak_bytes(fn) -> int:
    """Most bytes fn held at once beyond what existed before it, from the profiler's allocation timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            live += size
        elif action.name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak


def test_peak_is_one_fp32_chunk(single_process):
    tokens, vocab, chunk = 256, 8192, 32
    logits = torch.randn(tokens, vocab).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))

    def step(loss_fn):
        def run():
            activations = logits * 1  # a non-leaf, as the model's logits are (made outside the window)
            yield
            loss_fn(activations, labels).sum().backward()
        return run

    peaks = {}
    for name, loss_fn in [("unchunked", megatron_unchunked),
                          ("chunked", lambda x, y: chunked_vocab_parallel_cross_entropy(x, y, chunk))]:
        logits.grad = None
        run = step(loss_fn)()
        next(run)
        peaks[name] = peak_bytes(lambda: next(run, None))
    fp32_logits, fp32_chunk = tokens * vocab * 4, chunk * vocab * 4
    assert peaks["unchunked"] >= fp32_logits, peaks  # megatron's whole fp32 copy
    # One fp32 chunk, plus per-token floats and the bf16 gradient the leaf accumulates (2 x tokens x vocab).
    assert peaks["chunked"] <= fp32_chunk + tokens * vocab * 2 + 64 * 1024, peaks
    assert peaks["chunked"] < peaks["unchunked"] / 2, peaks
