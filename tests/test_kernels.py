"""Every kernel backend present computes eager's function: attention with ALiBi + causal mask, and
bias + GeLU, forward and backward, in fp32 and bf16; and a whole model on each backend gives
eager's logits. Tolerances: fp32 1e-5 absolute (reordered sums only); bf16 against the fp32 eager
reference 3e-2 absolute (bf16 keeps 8 bits of mantissa: ~4e-3 relative per rounding).

On a GPU the same checks run per backend on CUDA against the CPU's fp32 eager reference (TF32
off): attention, bias + GeLU (torch.compile'd for torch, flex and apex: Triton kernels there) and
a whole model's logits, which is where apex's FusedLayerNorm is used. The whole-model logits on
CUDA get 1e-4 (two blocks of GPU reductions in another order, against a CPU reference)."""
import pytest
import torch

from training.model.alibi import alibi_slopes
from training.model.kernels import (KernelUnavailable, available_backends, bias_gelu_eager, select_kernels)

CPU = torch.device("cpu")
BACKENDS = [b for b in available_backends(CPU) if b != "eager"]
GPU_BACKENDS = ["eager", "torch", "flex", "apex"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_without_tf32():
    """The CUDA device, TF32 off for the test (it would change fp32 matmuls on the GPU; the
    reference is exact fp32), the previous settings restored after; skips a backend not present."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _skip_unless_present(backend, device):
    if backend not in available_backends(device):
        pytest.skip(f"{backend} is not installed here (apex needs NVIDIA apex with its CUDA extensions)")


def _attention_inputs(heads=6, seq=33, head_dim=16):
    torch.manual_seed(0)
    return [torch.randn(2, heads, seq, head_dim, requires_grad=True) for _ in range(3)], alibi_slopes(heads)


def _run_attention(attention, inputs, slopes, dtype, device, backward=True):
    cast = [x.detach().to(device, dtype).requires_grad_(backward) for x in inputs]
    out = attention(*cast, slopes.to(device), 0.0)
    if not backward:
        return out.float().cpu(), []
    out.float().square().sum().backward()
    return out.float().cpu(), [x.grad.float().cpu() for x in cast]


def _check_attention(backend, dtype, device, head_dim=16):
    # FlexAttention has no backward on CPU (torch 2.13): its CPU check is forward only.
    backward = not (backend == "flex" and device.type == "cpu")
    inputs, slopes = _attention_inputs(head_dim=head_dim)
    eager = select_kernels("eager", CPU).attention
    ref_out, ref_grads = _run_attention(eager, inputs, slopes, torch.float32, CPU, backward)
    out, grads = _run_attention(select_kernels(backend, device).attention, inputs, slopes, dtype,
                                device, backward)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_matches_eager(backend, dtype):
    _check_attention(backend, dtype, CPU)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_attention_matches_eager_on_gpu(cuda_without_tf32, backend, dtype):
    _skip_unless_present(backend, cuda_without_tf32)
    _check_attention(backend, dtype, cuda_without_tf32)


# BLOOM's head dimensions: 1b1 has 96, 3b 80 (neither a power of two), the others 64 or 128.
@requires_cuda
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_flex_attention_at_bloom_head_dims_on_gpu(cuda_without_tf32, head_dim):
    _check_attention("flex", torch.bfloat16, cuda_without_tf32, head_dim)


def test_flex_refuses_small_heads_on_cuda_and_auto_falls_back():
    """Inductor's FlexAttention refuses a head dimension under 16 on CUDA at compile time (a
    LoweringException deep in the first step); the choice is made, and named, up front."""
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    with pytest.raises(KernelUnavailable, match="head dimension of at least 16.*has 8"):
        select_kernels("flex", cuda, 0.0, head_dim=8)
    if "apex" not in available_backends(cuda):
        assert select_kernels("auto", cuda, 0.0, head_dim=8).name == "torch"
        assert select_kernels("auto", cuda, 0.0, head_dim=64).name == "flex"
    assert select_kernels("flex", CPU, 0.0, head_dim=8).name == "flex"  # the CPU kernel has no such limit


def _check_bias_gelu(backend, dtype, device):
    torch.manual_seed(0)
    x, bias = torch.randn(4, 7, 64) * 3, torch.randn(64)
    ref = bias_gelu_eager(x, bias)
    xs = x.to(device, dtype).requires_grad_()
    bs = bias.to(device, dtype).requires_grad_()
    out = select_kernels(backend, device).bias_gelu(xs, bs)
    out.float().sum().backward()
    x.requires_grad_(), bias.requires_grad_()
    bias_gelu_eager(x, bias).sum().backward()
    tol = TOL[dtype]
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(xs.grad.float().cpu(), x.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(bs.grad.float().cpu(), bias.grad, atol=tol * 16, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu_matches_eager(backend, dtype):
    _check_bias_gelu(backend, dtype, CPU)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bias_gelu_matches_eager_on_gpu(cuda_without_tf32, backend, dtype):
    _skip_unless_present(backend, cuda_without_tf32)
    _check_bias_gelu(backend, dtype, cuda_without_tf32)


# Head dimension 16: the smallest FlexAttention's CUDA kernel takes.
TINY_MODEL = dict(hidden_size=96, num_layers=2, num_heads=6, vocab_size=256, init_std=0.05,
                  hidden_dropout=0.0, attention_dropout=0.0)


def _model(backend, device):
    from training.config.schema import ModelConfig
    from training.model.bloom import build_model

    # Built on the CPU from one seed whatever the device (use_cpu_initialization): same weights.
    return build_model(ModelConfig(**TINY_MODEL, kernels=backend), seed=3, device=device).eval()


@torch.no_grad()
def _logits(model, tokens):
    device = next(model.parameters()).device
    return model(tokens.to(device)).float().cpu()


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_logits_match_eager(single_process, backend):
    tokens = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(_logits(_model(backend, CPU), tokens), _logits(_model("eager", CPU), tokens),
                               atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_model_logits_match_eager_on_gpu(single_process, cuda_without_tf32, backend):
    _skip_unless_present(backend, cuda_without_tf32)
    model = _model(backend, cuda_without_tf32)
    # Every LayerNorm (2 per block, the embedding's, the final) is the backend's: apex's fused one.
    expected = select_kernels(backend, cuda_without_tf32).layer_norm
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, expected))]
    assert len(norms) == 2 * TINY_MODEL["num_layers"] + 2 and all(type(m) is expected for m in norms)
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 20))
    reference = _logits(_model("eager", CPU), tokens)
    assert reference.abs().max() > 0.1  # logits that say something at this tolerance
    torch.testing.assert_close(_logits(model, tokens), reference, atol=1e-4, rtol=1e-4)


def test_flex_refuses_attention_dropout():
    with pytest.raises(KernelUnavailable, match="attention_dropout"):
        select_kernels("flex", CPU, attention_dropout=0.1)


def test_unknown_backend_is_named():
    with pytest.raises(KernelUnavailable, match="model.kernels=fast"):
        select_kernels("fast", CPU)


def test_auto_resolves_to_a_present_backend():
    assert select_kernels("auto", CPU).name in available_backends(CPU)
