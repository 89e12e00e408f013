"""The export's self-check: the exported HF directory computes the training model's function.

Our BloomModel is built at TP=1 in this process from the checkpoint's weights, rounded to the
export dtype and back to fp32; HF's BloomForCausalLM loads the exported directory cast to fp32.
Both then hold identical fp32 weights, so any logits difference beyond fp32 rounding (1e-4) is a
conversion bug (a transposed QKV, a lost LayerNorm, a wrong vocabulary), not precision.
"""
import contextlib
import os
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist

SELF_CHECK_ATOL = 1e-4  # fp32 logits, the bound
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


class SelfCheckFailed(RuntimeError):
    """The exported model's logits differ from the training model's."""


@contextlib.contextmanager
def single_process_model_parallel():
    """megatron's parallel_state at TP=PP=DP=1 in this process, reusing one that already exists
    (a caller's process group) and tearing down only what it built."""
    from megatron.core import parallel_state

    from parallelism.topology import Layout, init_model_parallel, init_process_group, shutdown

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("the export self-check runs in a single process, not under a "
                               f"{dist.get_world_size()}-process group")
        built = not parallel_state.model_parallel_is_initialized()
        if built:
            init_model_parallel(Layout(1, 1, 1))
        try:
            yield
        finally:
            if built:
                parallel_state.destroy_model_parallel()
        return
    with launcher_env_restored():
        init_process_group("gloo")
        init_model_parallel(Layout(1, 1, 1))
        try:
            yield
        finally:
            shutdown()


@contextlib.contextmanager
def launcher_env_restored():
    """topology.init_process_group sets RANK/LOCAL_RANK/WORLD_SIZE for a lone process; left
    behind, they would make a later command in this process believe a launcher started it."""
    saved = {key: os.environ.get(key) for key in LAUNCHER_VARS}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def probe_tokens(vocab_size: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


@torch.no_grad()
def training_model_logits(tensors: Dict[str, torch.Tensor], shape: dict, tokens: torch.Tensor,
                          round_to: torch.dtype = torch.float32) -> torch.Tensor:
    """Full-vocabulary fp32 logits of our BloomModel (TP=1) holding `tensors` rounded to `round_to`."""
    from training.model.bloom import build_model, gather_logits
    from training.checkpoint.saved_model import model_config

    with single_process_model_parallel():
        model = build_model(model_config(shape), seed=0).eval()
        model.load_state_dict({k: v.to(round_to).to(torch.float32) for k, v in tensors.items()})
        return gather_logits(model(tokens)).clone()


@torch.no_grad()
def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import BloomForCausalLM

    model = BloomForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    return model(tokens).logits


def self_check(hf_dir: Path, tensors: Dict[str, torch.Tensor], shape: dict, dtype: torch.dtype) -> float:
    """The max abs logits difference on a probe batch; raises SelfCheckFailed above SELF_CHECK_ATOL."""
    tokens = probe_tokens(shape["vocab_size"])
    ours = training_model_logits(tensors, shape, tokens, round_to=dtype)
    theirs = hf_logits(hf_dir, tokens)
    if ours.shape != theirs.shape:
        raise SelfCheckFailed(f"logits shapes differ: training model {tuple(ours.shape)}, "
                              f"exported model {tuple(theirs.shape)}")
    diff = (ours - theirs).abs().max().item()
    if not diff < SELF_CHECK_ATOL:
        raise SelfCheckFailed(f"the exported model's logits differ from the training model's by {diff:.3g} "
                              f"(max abs, fp32; allowed {SELF_CHECK_ATOL}): the conversion is wrong")
    return diff
