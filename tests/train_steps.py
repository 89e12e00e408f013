"""A few optimizer steps of a tiny BLOOM on fixed synthetic batches, at any layout.

Global batch k is the same samples whatever the layout; each DP rank takes its share the way the
data sampler hands it out (micro-step m, rank r: samples m*mbs*dp + r*mbs ...), so two layouts that
compute the same function must report the same losses step for step.
"""
import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from training.engine.engine import BloomEngine
from parallelism.topology import Layout
from training.config.loader import load_config
from training.lr_schedule import learning_rate

# The demo model as shipped (bloom-tiny: hidden 128, 4 layers, 4 heads, 8192 vocabulary rows at every
# TP), on the eager kernels (every other backend is tested equal to them in test_kernels.py).
TINY = ["model.kernels=eager", "data.seq_length=32", "trainer.micro_batch_size=2",
        "trainer.global_batch_size=8", "optim.warmup_samples=0", "optim.lr=1e-3",
        "optim.min_lr=1e-4", "optim.decay_samples=1000"]


def global_batch(step: int, size: int, seq: int, vocab: int) -> torch.Tensor:
    """Tokens from the first eighth of the vocabulary: something a few steps can learn."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab // 8, (size, seq + 1), generator=generator)


def rank_micro_batches(samples: torch.Tensor, mbs: int, dp: int, dp_rank: int) -> list:
    micro = []
    for start in range(0, samples.shape[0], mbs * dp):
        chunk = samples[start + dp_rank * mbs: start + (dp_rank + 1) * mbs]
        micro.append({"tokens": chunk[:, :-1], "labels": chunk[:, 1:],
                      "loss_mask": torch.ones(chunk.shape[0], chunk.shape[1] - 1)})
    return micro


def make_engine(overrides: list, layout: Layout):
    cfg = load_config(TINY + list(overrides))
    return cfg, BloomEngine(cfg, layout, cfg.trainer.global_batch_size, torch.device("cpu"))


def train(cfg, engine, layout: Layout, first_step: int, steps: int, hook=None) -> list:
    """Steps first_step .. first_step+steps-1 (each step's batch and LR depend on its index only)."""
    t = cfg.trainer
    results = []
    for step in range(first_step, first_step + steps):
        samples = global_batch(step, t.global_batch_size, cfg.data.seq_length, cfg.model.vocab_size)
        micro = rank_micro_batches(samples, t.micro_batch_size, layout.dp,
                                   parallel_state.get_data_parallel_rank())
        engine.set_learning_rate(learning_rate(cfg.optim, step * t.global_batch_size))
        if hook:
            hook(step, engine)
        r = engine.train_step(micro)
        results.append({"loss": r.loss, "grad_norm": r.grad_norm, "skipped": r.skipped,
                        "loss_scale": r.loss_scale})
    return results


def run_steps(overrides: list, layout: Layout, steps: int, hook=None) -> list:
    """Losses (and grad norms, skip flags, loss scales) of `steps` steps from a fresh model;
    hook(step, engine) runs before each step (fault injection)."""
    cfg, engine = make_engine(overrides, layout)
    return train(cfg, engine, layout, 0, steps, hook)


def run_and_save(rank: int, overrides: list, layout: Layout, steps: int, out: str) -> None:
    results = run_steps(overrides, layout, steps)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
