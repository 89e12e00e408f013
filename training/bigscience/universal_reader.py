"""A DeepSpeed universal checkpoint (what ds_to_universal writes, and what BigScience released for
BLOOM's optimizer states), read one parameter at a time:

    DIR/zero/<optimizer name>/{fp32,exp_avg,exp_avg_sq}.pt   {"param": the whole tensor, "cat_dim", ...}
    DIR/zero/<optimizer name>/step.pt                          Adam's step (newer converters)
    DIR/zero/optimizer_state.pt                                param_groups (older converters keep
                                                               apex FusedAdam's "step" there)
    DIR/mp_rank_XX_model_states.pt                             args, iteration (training/bigscience/released.py)

The word embedding may have fewer rows than Megatron's padded vocabulary (ds_to_universal cuts it
to original_vocab_size): the missing rows are added as zeros, as DeepSpeed's own universal load
pads them.
"""
from pathlib import Path

import torch

from training.bigscience import layout
from training.bigscience.released import BigScienceError, model_states, read_released
from training.checkpoint.safe_unpickle import load
from training.model.param_table import Split


class UniversalSource:
    def __init__(self, directory, vocab=None):
        self.directory = Path(directory)
        if not (self.directory / "zero").is_dir():
            raise BigScienceError(f"{self.directory}: no zero/ folder (not a universal checkpoint; a "
                                  "global_stepN folder imports with --from megatron-deepspeed)")
        self.released = read_released(model_states(self.directory)[0], vocab)

    def states(self, n) -> dict:
        """{"master", "exp_avg", "exp_avg_sq"}: the whole fp32 tensors of one parameter (MdsName)."""
        out = {}
        for ours, theirs in zip(("master", "exp_avg", "exp_avg_sq"), layout.STATES):
            path = self.directory / "zero" / n.optimizer / f"{theirs}.pt"
            if not path.is_file():
                raise BigScienceError(f"{path}: missing: the universal checkpoint lacks {theirs} of {n.optimizer}")
            saved = load(path)
            tensor = saved.get("param") if isinstance(saved, dict) else saved
            if not isinstance(tensor, torch.Tensor):
                raise BigScienceError(f"{path}: holds no tensor")
            out[ours] = _pad_vocab(tensor.float(), n, self.released.shape["padded_vocab_size"])
        return out

    def adam_step(self, first) -> float:
        """Adam's step count: zero/<first parameter>/step.pt, else optimizer_state.pt's param_groups."""
        path = self.directory / "zero" / first.optimizer / "step.pt"
        if path.is_file():
            return float(load(path))
        state_file = self.directory / "zero" / "optimizer_state.pt"
        groups = (load(state_file).get("param_groups") or []) if state_file.is_file() else []
        steps = {float(g["step"]) for g in groups if "step" in g}
        if len(steps) != 1:
            raise BigScienceError(f"{self.directory}/zero: no Adam step count (no {first.optimizer}/step.pt, and "
                                  f"optimizer_state.pt's param groups give {sorted(steps) or 'none'})")
        return steps.pop()


def _pad_vocab(tensor: torch.Tensor, n, rows: int) -> torch.Tensor:
    if n.spec.split is not Split.VOCAB or tensor.shape[0] >= rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
