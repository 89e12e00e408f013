"""Sequence parallelism (parallel.sequence_parallel=true) trains the same model: at TP2, TP2 x PP2 and
TP2 x DP2 (fp32, CPU, gloo, dropout 0) the 5 steps' losses and global gradient norms match the
single-process run within 1e-4 relative, as tests/test_layout_parity.py holds the other layouts.

Each launch also checks that the sequence really is split (every block sees seq/TP tokens on every
rank, each rank a different slice) and the collectives it rests on: gloo's all_gather_into_tensor
and reduce_scatter_tensor, through our autograd functions, against plain tensor arithmetic. The TP2
launch also counts a block's kept activation bytes under sequence parallelism against the memory
estimate (none, selective, full; as tests/test_recompute.py does without it), checks where hidden
dropout draws its masks, and that recomputation with dropout 0.1 replays them bitwise.
With dropout on, a sequence-parallel run draws its hidden-dropout masks per TP rank (Megatron's
rule) and so is not bitwise the run without it; the parity runs use dropout 0.
"""
import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from parallelism.sequence_parallel import (gather_from_sequence, reduce_scatter_to_sequence,
                                           scatter_to_sequence)
from parallelism.topology import Layout
from parallelism.tensor_parallel import tensor_parallel_from_state
from tests.multiprocess import run_processes
from tests.test_recompute import CFG as RECOMPUTE_CFG, TOLERANCE as KEPT_TOLERANCE, kept_bytes
from tests.test_layout_parity import STEPS, assert_steps_match
from tests.train_steps import make_engine, train
from training.config.checks import validate
from training.config.loader import ConfigError, load_config
from training.model.bloom import BloomBlock, build_model, hidden_dropout_stream
from training.plan.memory_estimate import per_layer_activation_bytes

SEQ = 32  # tests/train_steps.py's TINY


def check_collectives() -> None:
    """The sequence-parallel mappings and their gradients against whole-tensor arithmetic."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    whole = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # the same on every rank
    mine = whole.chunk(tp, dim=1)[rank]
    x = mine.clone().requires_grad_()
    gathered = gather_from_sequence(x)
    assert torch.equal(gathered, whole)
    (gathered * (rank + 1)).sum().backward()  # d/dx of the sum over ranks: sum of (rank + 1)
    assert torch.equal(x.grad, torch.full_like(mine, tp * (tp + 1) / 2))
    partial = (whole * (rank + 1)).requires_grad_()
    summed = reduce_scatter_to_sequence(partial)
    assert torch.equal(summed, mine * tp * (tp + 1) / 2)
    summed.sum().backward()
    assert torch.equal(partial.grad, torch.ones_like(whole))
    assert torch.equal(scatter_to_sequence(whole), mine)


def check_blocks_see_their_slice(engine) -> list:
    """A forward hook on every block: its input is [micro, seq/TP, hidden] and differs across TP."""
    seen = []

    def hook(module, args):
        seen.append(args[0].shape[1])
        mine = args[0].detach().clone()
        pieces = [torch.empty_like(mine) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
        dist.all_gather(pieces, mine, group=parallel_state.get_tensor_model_parallel_group())
        assert not torch.equal(pieces[0], pieces[1]), "TP ranks hold the same activations"

    blocks = [m for m in engine.module.modules() if isinstance(m, BloomBlock)]
    handles = [b.register_forward_pre_hook(hook) for b in blocks]
    return seen, handles


def check_dropout_streams() -> None:
    """Outside the TP matmuls, dropout draws the same mask on every TP rank without sequence
    parallelism (they hold the same tokens) and a different one per rank with it (their own tokens)."""
    tp = tensor_parallel_from_state(seed=9, device="cpu")
    for sequence_parallel in (False, True):
        with hidden_dropout_stream(tp.rng, sequence_parallel):
            mine = torch.rand(64)
        pieces = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(pieces, mine, group=parallel_state.get_tensor_model_parallel_group())
        assert torch.equal(pieces[0], pieces[1]) != sequence_parallel


def check_kept_bytes() -> None:
    """A block's activations for backward under sequence parallelism are the estimate's (TP2)."""
    for recompute in ("none", "selective", "full"):
        cfg = dataclasses.replace(RECOMPUTE_CFG, recompute=recompute)
        tp = tensor_parallel_from_state(seed=3, device="cpu", sequence_parallel=True)
        block = build_model(cfg, seed=3, tp=tp).h[0]
        x = torch.randn(2, SEQ // 2, cfg.hidden_size, requires_grad=True)
        with pytest.MonkeyPatch.context() as monkeypatch:
            counted = kept_bytes(block, x, monkeypatch)
        estimated = per_layer_activation_bytes(cfg, 2, SEQ, 2, recompute, 4, 4, sequence_parallel=True)
        assert 0 <= (counted - estimated) / estimated < KEPT_TOLERANCE, (recompute, counted, estimated)


def _loss_and_grads(cfg) -> tuple:
    tp = tensor_parallel_from_state(seed=11, device="cpu", sequence_parallel=True)
    model = build_model(cfg, seed=11, tp=tp)
    generator = torch.Generator().manual_seed(4)
    tokens, labels = (torch.randint(0, cfg.vocab_size, (2, SEQ), generator=generator) for _ in range(2))
    torch.manual_seed(5)  # the shared stream starts at the same point in every run
    loss = model.loss(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def check_recompute_replays_dropout() -> None:
    """Under sequence parallelism hidden dropout draws from the TP stream too: selective and full
    recomputation (collectives rerun in backward) give bitwise the loss and gradients of none."""
    plain_loss, plain_grads = _loss_and_grads(RECOMPUTE_CFG)
    for recompute in ("selective", "full"):
        loss, grads = _loss_and_grads(dataclasses.replace(RECOMPUTE_CFG, recompute=recompute))
        assert torch.equal(loss, plain_loss), recompute
        for name, grad in plain_grads.items():
            assert torch.equal(grads[name], grad), (recompute, name)


def _worker(rank, layout: Layout, out: str) -> None:
    check_collectives()
    if layout.world_size == 2:  # once is enough
        check_dropout_streams()
        check_kept_bytes()
        check_recompute_replays_dropout()
    overrides = [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", "parallel.zero_stage=1",
                 "parallel.sequence_parallel=true"]
    cfg, engine = make_engine(overrides, layout)
    seen, handles = check_blocks_see_their_slice(engine)
    results = train(cfg, engine, layout, 0, STEPS)
    for handle in handles:
        handle.remove()
    assert seen and set(seen) == {SEQ // layout.tp}, seen
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def sequence_parallel_results(tmp_path, layout: Layout) -> list:
    out = tmp_path / f"sp-tp{layout.tp}-pp{layout.pp}-dp{layout.dp}.json"
    run_processes(_worker, layout, layout, str(out))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(single_process_steps):
    return single_process_steps


@pytest.mark.parametrize("layout", [Layout(2, 1, 1), Layout(2, 2, 1), Layout(2, 1, 2)],
                         ids=["tp2", "tp2-pp2", "tp2-dp2"])
def test_sequence_parallel_matches_single_process(tmp_path, reference, layout):
    assert_steps_match(sequence_parallel_results(tmp_path, layout), reference)


def test_sequence_parallel_needs_tp():
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel=true needs parallel.tp > 1 \(got tp=1\)"):
        validate(load_config(["parallel.sequence_parallel=true"]), 1)
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel=true needs data.seq_length=33 divisible"):
        validate(load_config(["parallel.sequence_parallel=true", "parallel.tp=2", "data.seq_length=33"]), 2)
    assert validate(load_config(["parallel.sequence_parallel=true", "parallel.tp=2"]), 2).tp == 2
