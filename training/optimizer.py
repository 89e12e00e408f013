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

    def _local_nonfinite(self) -> bool:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and not torch.isfinite(param.grad).all():
                    return True
        return False

    @torch.no_grad()
    def step(self, closure=None):
        flag = torch.tensor([1.0 if self._local_nonfinite() else 0.0], device=self._device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.skipped_last_step = bool(flag.item())
        if self.skipped_last_step:
            return None
        return super().step(closure)

    def _device(self):
        for group in self.param_groups:
            for param in group["params"]:
                return param.device
        return torch.device("cpu")


def build_optimizer(model: nn.Module, optim: OptimConfig) -> GuardedAdamW:
    return GuardedAdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr,
                        betas=(optim.beta1, optim.beta2), eps=optim.eps)
