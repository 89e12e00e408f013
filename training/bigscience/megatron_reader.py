"""A Megatron-DeepSpeed global_stepN folder (training/bigscience/layout.py), read one pipeline stage
at a time: the fp32 masters and Adam's moments come from the optimizer files, not from the layer
files (which hold the weights in bf16 for a bf16 run: a continuation needs the fp32 masters).

Each (stage, TP rank) has one optimizer file per DP rank, a ZeRO partition of one flat group per
param group; param_slice_mappings says where each parameter's piece starts in it. A parameter's
TP shard is its pieces in DP order (DeepSpeed cuts the flat group into consecutive partitions),
and the full tensor its TP shards merged as ds_to_universal merges them (layout.merge_tp). The
files are memory-mapped, one stage at a time, and read one parameter at a time.
"""
from pathlib import Path

import torch

from training.bigscience import layout
from training.bigscience.released import BigScienceError, model_states, read_released
from training.checkpoint.safe_unpickle import load


class MegatronSource:
    def __init__(self, directory, vocab=None):
        self.directory = Path(directory)
        if (self.directory / "zero").is_dir():
            raise BigScienceError(f"{self.directory} is a universal checkpoint: import it with --from universal")
        files = model_states(self.directory)
        self.released = read_released(files[0], vocab)
        tp, pp = self.released.tp, self.released.pp
        if len(files) != tp * pp:
            raise BigScienceError(f"{self.directory}: {len(files)} mp_rank files, but args say TP {tp} x PP {pp}")
        self.optim = self._optimizer_files(tp * pp)
        self.dp = len(self.optim) // (tp * pp)
        # optimizer name -> its stage, and each (stage, TP rank)'s TP shard shapes
        self.shapes, self.stage_of = {}, {}
        for stage in range(pp):
            for rank in range(tp):
                path = self.directory / layout.model_states_file(layout.mp_rank(stage, rank, tp))
                state = load(path)
                for group in (state.get("param_shapes") if isinstance(state, dict) else None) or []:
                    for name, shape in group.items():
                        self.shapes[(stage, rank, name)] = tuple(shape)
                        self.stage_of.setdefault(name, stage)
        self._stage, self._files = None, []

    def _optimizer_files(self, mp_ranks: int) -> dict:
        found = {}
        for path in self.directory.iterdir():
            match = layout.OPTIM_FILE.match(path.name)
            if match:
                found[(int(match.group(1)), int(match.group(2)))] = path
        dp = max(1, -(-len(found) // mp_ranks))  # rounded up: a missing file is then named
        missing = [(d, m) for d in range(dp) for m in range(mp_ranks) if (d, m) not in found]
        if not found or missing or len(found) != dp * mp_ranks:
            raise BigScienceError(f"{self.directory}: the optimizer files (bf16_zero_pp_rank_D_mp_rank_XX_optim_states.pt) "
                                  f"are incomplete: {len(found)} for {mp_ranks} mp ranks"
                                  + (f", dp {missing[0][0]} mp {missing[0][1]} missing" if missing else ""))
        return found

    def states(self, n) -> dict:
        """{"master", "exp_avg", "exp_avg_sq"}: the whole fp32 tensors of one parameter (MdsName)."""
        stage = self.stage_of.get(n.optimizer)
        if stage is None:
            raise BigScienceError(f"{self.directory}: no parameter {n.optimizer} in the mp_rank files' param_shapes")
        if stage != self._stage:  # the stage's files, mapped: only the slices read below are paged in
            self._stage, self._files = stage, self._open_stage(stage)
        tp, shards = self.released.tp, {}
        for rank in range(tp):
            pieces = [_pieces(path, optim, n.optimizer) for path, optim in self._files[rank]]
            if not any(pieces):
                raise BigScienceError(f"{self.directory}: the optimizer files of stage {stage} hold no {n.optimizer}")
            shape = self.shapes[(stage, rank, n.optimizer)]
            shards[rank] = {state: torch.cat([p[state] for p in pieces if p]).view(shape) for state in layout.STATES}
        return {ours: layout.merge_tp([shards[rank][theirs] for rank in range(tp)], n.spec.split)
                for ours, theirs in zip(("master", "exp_avg", "exp_avg_sq"), layout.STATES)}

    def _open_stage(self, stage: int) -> list:
        """Per TP rank, [(path, optimizer state)] of its DP ranks in order, memory-mapped."""
        tp = self.released.tp
        return [[(path, _optimizer_state(path)) for path in
                 (self.optim[(dp, layout.mp_rank(stage, rank, tp))] for dp in range(self.dp))] for rank in range(tp)]

    def adam_step(self, first) -> float:
        """Adam's step count, from the first optimizer file: its state, else its param groups."""
        base = _optimizer_state(self.optim[(0, 0)])["base_optimizer_state"]
        for holder in [*(base.get("state") or {}).values(), *(base.get("param_groups") or [])]:
            if "step" in holder:
                return float(holder["step"])
        raise BigScienceError(f"{self.optim[(0, 0)]}: no Adam step count in its optimizer state")


def _optimizer_state(path: Path) -> dict:
    state = load(path, mmap=True)
    optim = state.get("optimizer_state_dict") if isinstance(state, dict) else None
    needed = ("param_slice_mappings", "single_partition_of_fp32_groups", "base_optimizer_state")
    missing = [key for key in needed if not isinstance(optim, dict) or key not in optim]
    if missing:
        raise BigScienceError(f"{path}: not a ZeRO/BF16 optimizer file (no optimizer_state_dict.{missing[0]})")
    return optim


def _pieces(path: Path, optim: dict, name: str) -> dict:
    """{DeepSpeed state name: this DP rank's piece of `name`}, or {} when this rank holds none."""
    for index, mapping in enumerate(optim["param_slice_mappings"]):
        if name not in mapping:
            continue
        group = optim["base_optimizer_state"]["state"].get(index, {})
        missing = [key for key in ("exp_avg", "exp_avg_sq") if key not in group]
        if missing:
            raise BigScienceError(f"{path}: param group {index} has no {missing[0]} (Adam's moments are needed)")
        flat = {"fp32": optim["single_partition_of_fp32_groups"][index], **{k: group[k] for k in ("exp_avg", "exp_avg_sq")}}
        address = mapping[name]
        if not (isinstance(getattr(address, "start", None), int) and isinstance(getattr(address, "numel", None), int)):
            raise BigScienceError(f"{path}: param_slice_mappings gives {name} no fragment_address(start, numel)")
        return {state: t.narrow(0, address.start, address.numel).float().clone() for state, t in flat.items()}
    return {}
