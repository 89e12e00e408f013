"""The DeepSpeed engine around BLOOM: PipelineEngine (1F1B, ZeRO 0-1) when PP > 1, the plain
DeepSpeedEngine (ZeRO 0-3) when PP = 1, behind one `train_step` / `eval_loss` interface."""
from dataclasses import dataclass
from typing import List

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from parallelism.pipeline_topology import build_topology
from parallelism.tensor_parallel import tensor_parallel_from_state
from parallelism.topology import Layout
from training.engine.deepspeed_config import MegatronMPU, deepspeed_config, skip_shared_memory_comm_build
from training.engine.pipeline import BloomPipeline
from training.model.bloom import build_model
from training.model.kernels import select_kernels
from training.optimizer import build_optimizer


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool  # the weights did not change: a non-finite gradient, or an fp16 overflow
    overflow: bool  # fp16 only: the loss scaler found inf/NaN and lowers its scale (expected now and then)
    loss_scale: float
    spike: bool = False  # skipped because step_gate called it a loss spike (training/spikes.py)


class BloomEngine:
    def __init__(self, cfg, layout: Layout, initial_global_batch: int, device: torch.device):
        self.layout, self.device = layout, device
        self.pipelined = layout.pp > 1
        # DeepSpeed's comm layer adopts the torch.distributed group already formed.
        skip_shared_memory_comm_build()
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        seed = cfg.trainer.seed
        model = self._build_module(cfg, seed, device)
        self.optimizer = build_optimizer(model, cfg.optim)
        ds_config = deepspeed_config(cfg, layout, initial_global_batch)
        mpu = None if self.pipelined else MegatronMPU()
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    config=ds_config, mpu=mpu)
        self.global_batch = initial_global_batch
        self._zero0_norm = None
        if cfg.parallel.zero_stage == 0:
            self._clip_in_optimizer_step(cfg.optim.clip_grad)
        # step_gate(loss, grad_norm) -> truthy to skip the step: asked inside the optimizer step, before
        # the update, with this step's DP-mean loss and global gradient norm (training/spikes.py).
        self.step_gate = None
        self.optimizer.veto = self._veto
        self._gate_said = None  # the gate's answer for the step under way (asked once per step)
        self._step_loss = None
        # Fault injection (trainer.spike.inject_at): the training loss is multiplied by this.
        self.loss_factor = 1.0

    def _build_module(self, cfg, seed, device):
        self.tp = tensor_parallel_from_state(seed, device, sequence_parallel=cfg.parallel.sequence_parallel)
        if not self.pipelined:
            return build_model(cfg.model, seed=seed, device=device, tp=self.tp)
        kernels = select_kernels(cfg.model.kernels, device, cfg.model.attention_dropout,
                                 cfg.model.hidden_size // cfg.model.num_heads)
        pipeline = BloomPipeline(cfg.model, self.tp, kernels, seed, build_topology()).to(device)
        loss_fn = pipeline.loss_fn
        pipeline.loss_fn = lambda outputs, labels: self._scaled(loss_fn(outputs, labels))
        return pipeline

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.loss_factor == 1.0 else loss * self.loss_factor

    def tp_rng_state(self) -> torch.Tensor:
        return self.tp.rng.snapshot()

    def set_tp_rng_state(self, state: torch.Tensor) -> None:
        self.tp.rng.load_state_dict({"state": state})

    @property
    def module(self):
        return self.engine.module

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _set_global_batch(self, size: int) -> None:
        if size != self.global_batch:
            self.engine.set_train_batch_size(size)
            self.global_batch = size

    def _to_device(self, batch: dict):
        return (batch["tokens"].to(self.device), batch["labels"].to(self.device),
                batch["loss_mask"].to(self.device).float())

    def train_step(self, micro_batches: List[dict]) -> StepResult:
        """One optimizer step over this rank's micro-batches of a global batch."""
        self._set_global_batch(len(micro_batches) * self.layout.dp * micro_batches[0]["tokens"].shape[0])
        self.engine.train()
        self._gate_said, self._step_loss = None, None
        if self.pipelined:
            batches = [(t, (l, m)) for t, l, m in map(self._to_device, micro_batches)]
            loss = self.engine.train_batch(iter(batches)).item()
        else:
            loss = self._train_plain(micro_batches)
        overflow = bool(getattr(self.engine.optimizer, "overflow", False))
        skipped = overflow or self.optimizer.skipped_last_step
        spike = not overflow and self.optimizer.vetoed_last_step
        return StepResult(loss, self._grad_norm(), skipped, overflow, self._loss_scale(), spike)

    def _veto(self) -> bool:
        """This rank's answer to step_gate, asked by the optimizer before it applies the update
        (DeepSpeed's ZeRO optimizers call it once per parameter group: the first answer holds for
        the step). The gradient norm is already computed there (ZeRO: by DeepSpeed, before the
        clipping; ZeRO 0: by _clip_in_optimizer_step), and the loss of every micro-batch is known."""
        if self.step_gate is None:
            return False
        if self._gate_said is None:
            self._gate_said = bool(self.step_gate(self._loss_before_step(), self._norm_before_step()))
        return self._gate_said

    def _loss_before_step(self) -> float:
        if not self.pipelined:
            return self._step_loss
        # The pipeline's own reduction (DP mean on the last stage, broadcast to every stage), run
        # ahead of the one train_batch runs after its schedule: the same value, on every rank.
        return self.engine._aggregate_total_loss().item()

    def _norm_before_step(self) -> float:
        if self._zero0_norm is not None:
            return self._zero0_norm
        norm = getattr(self.engine.optimizer, "_global_grad_norm", None)
        return float(norm) if norm is not None else float("nan")

    def _train_plain(self, micro_batches) -> float:
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # Say where the step is: DeepSpeed's own count (micro_steps modulo the accumulation
            # steps) puts it in the wrong place once the batch rampup changes the count mid-run.
            self.engine.set_gradient_accumulation_boundary(last)
            loss = self._scaled(self.engine(*self._to_device(batch)))
            self.engine.backward(loss)
            total += loss.detach().float()
            if last:  # the step's loss, known before the optimizer step (step_gate reads it)
                self._step_loss = self._dp_mean(total / len(micro_batches))
            self.engine.step()
        return self._step_loss

    def _dp_mean(self, value: torch.Tensor) -> float:
        value = value.clone()
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        return (value / self.layout.dp).item()

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[dict]) -> float:
        """Mean loss over micro-batches (every DP rank's), weights untouched."""
        self.engine.eval()
        if self.pipelined:
            batches = [(t, (l, m)) for t, l, m in map(self._to_device, micro_batches)]
            loss = self.engine.eval_batch(iter(batches), num_micro_batches=len(batches)).item()
        else:
            losses = [self.engine(*self._to_device(b)).float() for b in micro_batches]
            loss = self._dp_mean(torch.stack(losses).mean())
        self.engine.train()
        return loss

    def _grad_norm(self) -> float:
        norm = self._zero0_norm if self._zero0_norm is not None else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _clip_in_optimizer_step(self, max_norm: float) -> None:
        """ZeRO 0: the global gradient norm (and the clipping by it) is computed here, between
        DeepSpeed's gradient all-reduce and the optimizer step. DeepSpeed's own ZeRO-0 clipping
        (runtime.utils.clip_grad_norm_) keeps no norm (get_global_grad_norm() stays None: the logs
        showed nan), and under a pipeline it adds a replicated parameter's gradient only on the first
        rank of the TP x PP group, so later stages' LayerNorms went uncounted and the tied
        embedding counted twice."""
        step = self.optimizer.step  # the engine calls our optimizer itself at ZeRO 0

        @torch.no_grad()
        def clipped_step(*args, **kwargs):
            norm = self._global_grad_norm()
            if max_norm > 0:
                coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
                for p in self.engine.module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
            self._zero0_norm = norm.item()
            return step(*args, **kwargs)

        self.optimizer.step = clipped_step

    def _global_grad_norm(self) -> torch.Tensor:
        """The 2-norm of the whole model's gradient, the same on every rank: each TP shard once,
        a TP-replicated parameter (LayerNorm, row-parallel bias) once per TP group, the tied
        embedding on its first pipeline stage only. Gradients are already averaged over DP."""
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in self.engine.module.parameters():
            if p.grad is None or getattr(p, "ds_pipe_replicated", False):
                continue
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                squares += p.grad.detach().float().square().sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return squares.sqrt()

    def _loss_scale(self) -> float:
        scale = getattr(self.engine.optimizer, "cur_scale", None)
        if scale is None:
            scale = getattr(self.engine.optimizer, "loss_scale", 1.0)
        return float(scale)
