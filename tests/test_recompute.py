"""model.recompute=none|selective|full: the same loss and gradients, fewer kept activations.

With dropout on (attention dropout drawn from the TP stream, hidden dropout from the shared one),
selective and full recomputation give bitwise the loss and gradients of recompute=none: the
recomputation replayed both random streams. And each keeps, per block, the bytes
training/plan/memory_estimate.py says: counted as the storages autograd's saved-tensor hooks are
handed, plus the inputs torch's checkpoint holds by reference for its rerun (its own hooks hide
what the recomputed region saves, and that is the point).
"""
import dataclasses

import pytest
import torch

import training.model.bloom as bloom
from training.config.loader import ConfigError, load_config
from training.config.checks import validate
from training.config.schema import ModelConfig
from training.model.bloom import build_model
from training.model.kernels import bias_gelu_eager, bias_gelu_formula
from training.plan.memory_estimate import attention_core_bytes, per_layer_activation_bytes

CFG = ModelConfig(hidden_size=32, num_layers=3, num_heads=4, vocab_size=128, init_std=0.05,
                  hidden_dropout=0.1, attention_dropout=0.1, kernels="eager")


def _loss_and_grads(cfg: ModelConfig, tokens, labels):
    model = build_model(cfg, seed=11)
    torch.manual_seed(5)  # the shared dropout stream starts at the same point in every run
    loss = model.loss(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputed_equals_plain(single_process, recompute):
    tokens, labels = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    plain_loss, plain_grads = _loss_and_grads(CFG, tokens, labels)
    loss, grads = _loss_and_grads(dataclasses.replace(CFG, recompute=recompute), tokens, labels)
    assert torch.equal(plain_loss, loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    no_dropout = dataclasses.replace(CFG, hidden_dropout=0.0, attention_dropout=0.0)
    assert not torch.equal(_loss_and_grads(no_dropout, tokens, labels)[0], plain_loss)  # dropout was on


class KeptBytes:
    """Distinct storages a forward keeps for backward (parameters excluded), in bytes."""

    def __init__(self, parameters):
        self.excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self.kept = {}

    def add(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def total(self) -> int:
        return sum(self.kept.values())


def kept_by_block(cfg: ModelConfig, monkeypatch, batch=2, seq=32) -> int:
    block = build_model(cfg, seed=3).h[0]
    return kept_bytes(block, torch.randn(batch, seq, cfg.hidden_size, requires_grad=True), monkeypatch)


def kept_bytes(block, x, monkeypatch) -> int:
    """Bytes block(x) keeps for backward, x included (test_sequence_parallel counts its slice)."""
    counter = KeptBytes(block.parameters())
    real_checkpoint = bloom.checkpoint

    def checkpoint_counting_inputs(fn, *args, **kwargs):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                counter.add(arg)
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(bloom, "checkpoint", checkpoint_counting_inputs)
    with torch.autograd.graph.saved_tensors_hooks(counter.add, lambda t: t):
        out = block(x)
    out.sum().backward()  # the kept tensors were enough to run backward
    return counter.total()


# Kept beyond the table: each LayerNorm's mean and rstd (2 x 2 x b*s floats), the causal mask
# (s*s bools) and the ALiBi slopes: 4*2*32*4 + 32*32 + 16 = 2064 bytes at this shape, 2.6% of
# selective's 80 KiB and 1.1% of none's. Full recomputation keeps exactly the block input.
TOLERANCE = 0.03


@pytest.mark.parametrize("dropout", [0.1, 0.0], ids=["dropout", "no-dropout"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_kept_bytes_are_the_estimate(single_process, monkeypatch, recompute, dropout):
    cfg = dataclasses.replace(CFG, recompute=recompute, hidden_dropout=dropout, attention_dropout=dropout)
    counted = kept_by_block(cfg, monkeypatch)
    # On CPU torch's dropout keeps its mask as a float tensor: masks cost the value width (fp32).
    estimated = per_layer_activation_bytes(cfg, 1, 32, 2, recompute, value_bytes=4, mask_bytes=4)
    assert counted >= estimated
    assert (counted - estimated) / estimated < TOLERANCE, (counted, estimated)


def test_selective_drops_exactly_the_attention_core(single_process, monkeypatch):
    none = kept_by_block(dataclasses.replace(CFG, recompute="none"), monkeypatch)
    selective = kept_by_block(dataclasses.replace(CFG, recompute="selective"), monkeypatch)
    # softmax output, dropout output and mask: 3 x 4 heads x s*s x 2 sequences x fp32 = 98304 bytes;
    # with them goes the causal mask masked_fill keeps (s*s bools), and selective holds the ALiBi
    # slopes (4 heads x fp32) as an input of its rerun.
    core = attention_core_bytes(CFG, 1, 32, 2, 4, 4)
    assert core == 3 * 4 * 32 * 32 * 2 * 4
    assert none - selective == core + 32 * 32 - 4 * 4


def test_eager_bias_gelu_backward_is_the_formulas():
    """The eager backend's hand-written GeLU backward (Megatron's) against autograd through the formula."""
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bias_gelu_eager, (x, bias))
    torch.testing.assert_close(bias_gelu_eager(x, bias), bias_gelu_formula(x, bias), rtol=0, atol=0)


def test_recompute_choices_are_checked():
    assert load_config(["model.recompute=selective"]).model.recompute == "selective"
    assert load_config(["experiment=bloom-176b"]).model.recompute == "full"
    with pytest.raises(ConfigError, match=r"^model.recompute=some is not one of none, selective, full$"):
        validate(load_config(["model.recompute=some"]), 1)
