"""The fp32 masters, Adam's moments and step, and the loss scaler of a running engine, read and
written piece by piece whatever DeepSpeed wrapped around our AdamW (no ZeRO; ZeRO 1-2, which link
each parameter to its optimizer state with `_hp_mapping`; ZeRO 3, with `ds_id`; the bf16 optimizer).

This and the engine are the only code that knows DeepSpeed's optimizer internals: the checkpointer
deals in files and layouts, and asks this for tensors under canonical (param_table) names.
"""
from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_local_fp32_param, safe_get_local_optimizer_state,
                             safe_set_local_fp32_param, safe_set_local_optimizer_state)

from training.engine.pipeline import canonical_name

ADAM_STATES = ("exp_avg", "exp_avg_sq")
SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class OptimizerState:
    def __init__(self, engine, num_layers: int):
        self.engine = engine
        named = list(engine.module.named_parameters())
        # [(canonical name, parameter)] this rank holds (a pipeline stage names them by layer index)
        self.params = named if not engine.pipelined else [(canonical_name(n, num_layers), p) for n, p in named]

    @property
    def _base(self):
        return self.engine.optimizer  # our AdamW

    @property
    def _wrapper(self):
        return self.engine.engine.optimizer  # what DeepSpeed put around it

    def zero(self) -> bool:
        """ZeRO's optimizer holds the fp32 masters and Adam state; DeepSpeed's safe_* helpers read
        stages 1-2 and 3 alike."""
        first = self.params[0][1]
        return hasattr(first, "_hp_mapping") or self.zero3()

    def zero3(self) -> bool:
        return hasattr(self.params[0][1], "ds_id")

    def ensure_adam_state(self) -> None:
        """Adam creates its moments at the first step; a checkpoint loaded before any step needs
        them now, zero, with step 0 (what the first step would have found)."""
        if self.zero3():
            targets = self._wrapper.fp32_partitioned_groups_flat
        elif self.zero():
            targets = _flat_fp32_partitions(self._wrapper)
        else:
            targets = [p for _, p in self.params]
        for tensor in targets:
            if not self._base.state.get(tensor):
                self._base.state[tensor] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(tensor, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(tensor, memory_format=torch.preserve_format)}
        if self.zero() and not self.zero3():
            # DeepSpeed links each parameter to its Adam state once, after the first step of the
            # first group, so later groups stay unlinked; link again now that every state exists.
            self._wrapper._hp_optimizer_states_linked = False
            self._wrapper._lazy_init_hp_params_optimizer_state()

    def adam_step(self) -> float:
        for state in self._base.state.values():
            if "step" in state:
                return float(state["step"])
        return 0.0

    def set_adam_step(self, step: float) -> None:
        for state in self._base.state.values():
            state["step"] = torch.tensor(float(step))

    def has_moments(self) -> bool:
        return self.adam_step() > 0

    def loss_scaler_state(self) -> dict:
        scaler = getattr(self._wrapper, "loss_scaler", None)
        return {k: getattr(scaler, k) for k in SCALER_KEYS if scaler and hasattr(scaler, k)}

    def restore_loss_scaler(self, saved: dict) -> None:
        scaler = getattr(self._wrapper, "loss_scaler", None)
        for key, value in saved.items():
            if scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, value)

    def shape(self, param) -> list:
        """The TP shard's shape (ZeRO 3 keeps it aside: the parameter itself is emptied)."""
        return list(param.ds_shape if self.zero3() else param.shape)

    def partition(self, param) -> Optional[tuple]:
        """(offset, numel) in the flattened TP shard of `param` of the range this rank's ZeRO
        partition holds, None when it holds none of it (ZeRO only)."""
        if self.zero3():
            size = param.ds_tensor.ds_numel
            offset = dist.get_rank(group=param.ds_process_group) * size
            numel = max(0, min(size, param.ds_numel - offset))  # the last partition is padded
            return (offset, numel) if numel else None
        mapping = param._hp_mapping
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel

    def local_piece(self, param, moments: bool):
        """(offset, numel, master, {state: moment}) of the flat range of this rank's TP shard of
        `param` that this rank's optimizer holds, or None when it holds none of it."""
        keys = ADAM_STATES if moments else ()
        if not self.zero():
            state = self._base.state.get(param, {})
            return 0, param.numel(), param.detach(), {k: state[k] for k in keys}
        partition = self.partition(param)
        if partition is None:
            return None
        offset, numel = partition
        if self.zero3():
            return offset, numel, safe_get_local_fp32_param(param)[:numel], \
                {k: safe_get_local_optimizer_state(param, k)[:numel] for k in keys}
        mapping = param._hp_mapping
        return offset, numel, mapping.hp_fragment, {k: mapping.get_optim_state_fragment(k) for k in keys}

    def put(self, param, key: Optional[str], value) -> None:
        """Hand a loaded tensor to the optimizer (key None: the fp32 master, else an Adam moment):
        a ZeRO partition straight into its fp32 partition (stage 3: padded to the partition's
        size; None when this rank holds none of it), a whole TP shard (no ZeRO) in place."""
        if not self.zero():
            with torch.no_grad():
                target = param if key is None else self._base.state[param][key]
                target.copy_(value.to(param.device))
        elif value is not None and self.zero3():
            padded = torch.zeros(param.ds_tensor.ds_numel, dtype=torch.float32)
            padded[:value.numel()] = value
            if key is None:
                safe_set_local_fp32_param(param, padded)
            else:
                safe_set_local_optimizer_state(param, padded, key)
        elif value is not None:
            mapping = param._hp_mapping
            target = mapping.hp_fragment if key is None else mapping.get_optim_state_fragment(key)
            with torch.no_grad():
                target.copy_(value.to(target.device))

    def refresh_weights(self) -> None:
        """After the masters are loaded into ZeRO's partitions: the model's own (16-bit or fp32)
        weights from them. Stage 3 keeps each rank's slice apart from the masters: copy the masters
        into those slices, then regather the parameters it keeps whole ("persistent"), as DeepSpeed
        does after each optimizer step; stages 1-2 all-gather the partitions over DP."""
        zero = self._wrapper
        if self.zero3():
            for group in range(len(zero.fp16_groups)):
                zero._reassign_or_swap_out_partitioned_parameters(group)
            if zero.persistent_parameters:
                zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
        elif self.zero():
            zero.update_lp_params()


def _flat_fp32_partitions(zero) -> list:
    """The flat fp32 partitions Adam steps on. DeepSpeed's ZeRO-1/2 optimizer calls them
    single_partition_of_fp32_groups; in bf16 with fp32 gradient accumulation at ZeRO-1 (BLOOM-176B's
    recipe) DeepSpeed runs its BF16_Optimizer instead, which calls them fp32_groups_flat_partition."""
    if hasattr(zero, "single_partition_of_fp32_groups"):
        return zero.single_partition_of_fp32_groups
    return zero.fp32_groups_flat_partition
