"""AdamW with BLOOM's settings, and the guard that skips a step whose gradients are not finite."""
import torch
import torch.distributed as dist
from torch import nn

from training.config.schema import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list:
    """Weight decay on matrices only: biases and LayerNorm parameters (every 1-D tensor) get
    none, as in Megatron."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that leaves weights and moments untouched when any rank holds an inf or NaN gradient.

    DeepSpeed's fp16 loss scaler skips overflowing steps itself, but in bf16 and fp32 a NaN loss
    or gradient would flow into the weights; here every rank agrees (one all-reduce) and skips.
    Under ZeRO each rank sees only its partition, hence the agreement.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.skipped_last_step = False
        # veto() -> True: skip this step though its gradients are finite (a loss spike; set by
        # BloomEngine, asked on every rank, agreed in the same all-reduce as the finiteness).
        self.veto = None
        self.vetoed_last_step = False

    def _local_nonfinite(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return False
        # One fused read of the gradients: an inf or NaN anywhere makes their 2-norm non-finite, so a
        # finite norm proves them all finite. `torch.isfinite(g).all()` per tensor was the slow way
        # on CPU: 110 ms against 4 ms for one flat 29M-value fp32 partition (ZeRO), 1.2 s against
        # 14 ms for 100 tensors of 1M (ZeRO 0). A non-finite norm can also be finite values whose
        # squares overflow fp32; that rare case is settled element by element.
        if torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            return False
        return any(not torch.isfinite(g).all() for g in grads)

    @torch.no_grad()
    def step(self, closure=None):
        vetoed = bool(self.veto()) if self.veto is not None else False
        flag = torch.tensor([1.0 if self._local_nonfinite() else 0.0, float(vetoed)], device=self._device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.skipped_last_step = bool(flag.max().item())
        self.vetoed_last_step = bool(flag[1].item()) and not bool(flag[0].item())
        if self.skipped_last_step:
            return None
        return super().step(closure)

    def _device(self):
        for group in self.param_groups:
            for param in group["params"]:
                return param.device
        return torch.device("cpu")


def build_optimizer(model: nn.Module, optim: OptimConfig) -> GuardedAdamW:
    # torch's fused AdamW: one kernel per tensor, no temporaries. On CPU, for the one flat fp32
    # partition DeepSpeed's ZeRO hands the optimizer (29M values), 17 ms per step against 164 ms for
    # the default per-tensor loop and 111 ms for foreach (one thread); it runs on CPU and CUDA alike.
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"}
    return GuardedAdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr,
                        betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused or None)
