"""Activation checkpointing recomputes exactly: with dropout on (attention dropout drawn from the
TP stream, hidden dropout from the shared one), a checkpointed model gives the loss and gradients
of the same model without checkpointing, so the recomputation replayed both random streams."""
import dataclasses

import torch

from training.config.schema import ModelConfig
from training.model.bloom import build_model


def _loss_and_grads(cfg: ModelConfig, tokens, labels):
    model = build_model(cfg, seed=11)
    torch.manual_seed(5)  # the shared dropout stream starts at the same point in both runs
    loss = model.loss(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_checkpointed_equals_plain(single_process):
    cfg = ModelConfig(hidden_size=32, num_layers=3, num_heads=4, vocab_size=128, init_std=0.05,
                      hidden_dropout=0.2, attention_dropout=0.2, kernels="eager")
    tokens, labels = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    plain_loss, plain_grads = _loss_and_grads(cfg, tokens, labels)
    ckpt_cfg = dataclasses.replace(cfg, activation_checkpointing=True)
    ckpt_loss, ckpt_grads = _loss_and_grads(ckpt_cfg, tokens, labels)
    assert torch.equal(plain_loss, ckpt_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=0, msg=name)
    no_dropout = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)
    assert not torch.equal(_loss_and_grads(no_dropout, tokens, labels)[0], plain_loss)  # dropout was on
