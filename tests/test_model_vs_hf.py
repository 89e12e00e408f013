"""Our Megatron-style BLOOM computes HF BloomForCausalLM's function: same weights, same logits,
loss and gradients, at TP=1 (one process) and TP=2 (two processes over gloo), for a power-of-two
head count (16) and a non-power-of-two one (12, whose ALiBi slopes interleave two series)."""
import pytest
import torch
import torch.nn.functional as F

from parallelism.topology import Layout
from tests.hf_reference import random_hf_model
from tests.multiprocess import run_processes
from training.config.schema import ModelConfig
from training.hf.convert import shard_from_hf
from training.model.bloom import build_model, gather_logits, language_model_loss
from training.model.param_table import iter_parameters

VOCAB = 512  # a multiple of 128 x TP for TP 1 and 2: no padding beyond HF's vocabulary
SHAPES = {
    "16-heads": dict(hidden_size=64, num_layers=2, num_heads=16),
    "12-heads": dict(hidden_size=96, num_layers=3, num_heads=12),
}
LOGITS_ATOL = 1e-4  # fp32; the bound
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


def model_config(shape: str) -> ModelConfig:
    return ModelConfig(**SHAPES[shape], vocab_size=VOCAB, init_std=0.02, hidden_dropout=0.0,
                       attention_dropout=0.0, kernels="eager")


def compare_with_hf(shape: str, tp_rank: int, tp_size: int) -> None:
    cfg = model_config(shape)
    hf = random_hf_model(cfg, VOCAB, seed=1)
    ours = build_model(cfg, seed=7)
    ours.load_state_dict(shard_from_hf(hf.state_dict(), cfg.num_layers, tp_rank, tp_size, VOCAB))
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (2, 24))
    labels = torch.randint(0, VOCAB, (2, 24))

    hf_logits = hf(tokens).logits
    hf_loss = F.cross_entropy(hf_logits.reshape(-1, VOCAB), labels.reshape(-1))
    hf_loss.backward()

    parallel_logits = ours(tokens)
    logits = gather_logits(parallel_logits.detach().clone())  # the loss consumes its input
    loss = language_model_loss(parallel_logits, labels)
    loss.backward()

    assert (logits - hf_logits).abs().max().item() < LOGITS_ATOL
    torch.testing.assert_close(loss, hf_loss, rtol=1e-6, atol=1e-6)
    hf_params = dict(hf.named_parameters())
    our_params = dict(ours.named_parameters())
    for name, hf_name, spec, _ in iter_parameters(cfg.num_layers):
        expected = hf_params[hf_name].grad
        if spec.split.dim is not None:
            expected = expected.chunk(tp_size, dim=spec.split.dim)[tp_rank]
        torch.testing.assert_close(our_params[name].grad, expected, rtol=GRAD_RTOL, atol=GRAD_ATOL,
                                   msg=lambda m: f"{name} (rank {tp_rank}/{tp_size}): {m}")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_tp1_matches_hf(single_process, shape):
    compare_with_hf(shape, 0, 1)


def _tp2_worker(rank, shapes):
    for shape in shapes:
        compare_with_hf(shape, rank, 2)


def test_tp2_matches_hf():
    run_processes(_tp2_worker, Layout(tp=2, pp=1, dp=1), sorted(SHAPES))
