"""Kernel backends behind one switch, `model.kernels`.

- eager: the reference: explicit matmuls, ALiBi added to fp32 scores, fp32 softmax, BLOOM's tanh GeLU.
- torch: torch-native fusion: scaled_dot_product_attention with the ALiBi + causal bias as its
  mask, and a torch.compile'd bias + GeLU.
- flex: FlexAttention with ALiBi as a score_mod and a causal block mask (the bias is never
  materialised), plus the compiled bias + GeLU. FlexAttention has no dropout, so it is only valid
  with model.attention_dropout == 0 or at evaluation; on CPU it has no backward (torch 2.13), so
  there it serves evaluation only. On CUDA its Triton kernel needs a head dimension of at least 16
  (inductor refuses smaller ones at compile time: seen on an H200, torch 2.11); every BLOOM size
  has 64-128.
- apex: the torch backend with apex's FusedLayerNorm; only where apex is importable.
- auto: the fastest one present: on CUDA flex (torch when attention dropout is on or the head
  dimension is under 16) with apex's layer norm where installed; on CPU torch.

Every backend computes the same function; tests/test_kernels.py holds each against eager.
"""
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from training.config.schema import KERNEL_BACKENDS as BACKENDS
from training.model.alibi import relative_alibi_bias

FLEX_MIN_HEAD_DIM_CUDA = 16  # inductor's FlexAttention lowering: "embedding dimension ... at least 16"


class KernelUnavailable(ValueError):
    """The chosen backend cannot run here (missing package, unsupported setting)."""


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's GeLU, the tanh approximation, written as in Megatron-DeepSpeed and HF."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def bias_gelu_formula(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return gelu_tanh(x + bias)


class _BiasGeLU(torch.autograd.Function):
    """Megatron's bias + GeLU: backward keeps only the input and recomputes the rest, where
    autograd through the formula would keep five more tensors of the FFN's width."""

    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return bias_gelu_formula(x, bias)

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        y = x + bias
        tanh_out = torch.tanh(0.79788456 * y * (1.0 + 0.044715 * y * y))
        # d/dy of 0.5*y*(1 + tanh(0.79788456*(y + 0.044715*y^3))); 0.1070322243 = 3*0.044715*0.79788456
        slope = 0.5 * y * ((1.0 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * y * y)) + 0.5 * (1.0 + tanh_out)
        grad_x = slope * grad
        return grad_x, grad_x.sum_to_size(bias.shape)


def bias_gelu_eager(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _BiasGeLU.apply(x, bias)


@functools.lru_cache(maxsize=None)
def _compiled_bias_gelu():
    # Compiled once per process; dynamic shapes so a new sequence length does not recompile.
    # The compiler picks what backward keeps (it recomputes pointwise ops, as _BiasGeLU does).
    return torch.compile(bias_gelu_formula, dynamic=True)


def bias_gelu_compiled(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _compiled_bias_gelu()(x, bias)


def causal_mask(seq_len: int, device) -> torch.Tensor:
    """True where a query must not see a key (the future)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


def attention_eager(q, k, v, slopes, dropout_p: float) -> torch.Tensor:
    """q, k, v: [batch, heads, seq, head_dim]; slopes: [heads] fp32. Returns [batch, heads, seq, head_dim]."""
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(head_dim)
    scores = scores + relative_alibi_bias(slopes, seq_len, q.device)
    scores = scores.masked_fill(causal_mask(seq_len, q.device), torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v)


def attention_sdpa(q, k, v, slopes, dropout_p: float) -> torch.Tensor:
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    bias = relative_alibi_bias(slopes, seq_len, q.device)
    bias = bias.masked_fill(causal_mask(seq_len, q.device), float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.unsqueeze(0), dropout_p=dropout_p, scale=1.0 / math.sqrt(head_dim)
    )


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _causal_block_mask(seq_len: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal, None, None, seq_len, seq_len, device=device)


def attention_flex(q, k, v, slopes, dropout_p: float) -> torch.Tensor:
    if dropout_p > 0:
        raise KernelUnavailable(
            "model.kernels=flex has no attention dropout: set model.attention_dropout=0 or use kernels=torch"
        )
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise KernelUnavailable(
            "model.kernels=flex cannot train on CPU (FlexAttention has no CPU backward): use kernels=torch"
        )
    slopes = slopes.to(q.device)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    block_mask = _causal_block_mask(q.shape[-2], str(q.device))
    scale = 1.0 / math.sqrt(q.shape[-1])
    return _compiled_flex_attention()(q, k, v, score_mod=alibi, block_mask=block_mask, scale=scale)


def apex_layer_norm_class():
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        return None
    return FusedLayerNorm


@dataclass(frozen=True)
class Kernels:
    name: str
    attention: Callable
    bias_gelu: Callable
    layer_norm: type

    def make_layer_norm(self, hidden_size: int, eps: float) -> nn.Module:
        return self.layer_norm(hidden_size, eps=eps)


def available_backends(device: torch.device) -> list:
    """The concrete backends that can run on this device (auto excluded)."""
    found = ["eager", "torch", "flex"]
    if apex_layer_norm_class() is not None and device.type == "cuda":
        found.append("apex")
    return found


def select_kernels(name: str, device: torch.device, attention_dropout: float = 0.0,
                   head_dim: Optional[int] = None) -> Kernels:
    """The kernels a model uses; `auto` resolves to the fastest backend present on `device`.
    `head_dim` (hidden size / heads) decides whether FlexAttention can run on CUDA."""
    if name not in BACKENDS:
        raise KernelUnavailable(f"model.kernels={name} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = _auto_backend(device, attention_dropout, head_dim)
    if name == "eager":
        return Kernels("eager", attention_eager, bias_gelu_eager, nn.LayerNorm)
    if name == "torch":
        return Kernels("torch", attention_sdpa, bias_gelu_compiled, nn.LayerNorm)
    if name == "flex":
        if attention_dropout > 0:
            raise KernelUnavailable(
                "model.kernels=flex has no attention dropout: set model.attention_dropout=0 or use kernels=torch"
            )
        if not _flex_runs(device, head_dim):
            raise KernelUnavailable(
                f"model.kernels=flex needs a head dimension of at least {FLEX_MIN_HEAD_DIM_CUDA} on CUDA "
                f"(FlexAttention's Triton kernel); this model has {head_dim}: use kernels=torch")
        return Kernels("flex", attention_flex, bias_gelu_compiled, nn.LayerNorm)
    apex_ln = apex_layer_norm_class()
    if apex_ln is None or device.type != "cuda":
        raise KernelUnavailable("model.kernels=apex needs NVIDIA apex (with its CUDA extensions) and a GPU")
    flex = attention_dropout == 0 and _flex_runs(device, head_dim)
    return Kernels("apex", attention_flex if flex else attention_sdpa, bias_gelu_compiled, apex_ln)


def _flex_runs(device: torch.device, head_dim: Optional[int]) -> bool:
    return device.type != "cuda" or head_dim is None or head_dim >= FLEX_MIN_HEAD_DIM_CUDA


def _auto_backend(device: torch.device, attention_dropout: float, head_dim: Optional[int]) -> str:
    if device.type != "cuda":
        return "torch"
    if apex_layer_norm_class() is not None:
        return "apex"
    return "flex" if attention_dropout == 0 and _flex_runs(device, head_dim) else "torch"
