"""A Megatron-DeepSpeed global_stepN folder (training/bigscience/layout.py), read one pipeline stage
at a time: the fp32 masters and Adam's moments come from the optimizer files, not from the layer
files (which hold the weights in bf16 for a bf16 run: a continuation needs the fp32 masters).

Each (stage, TP rank) has one optimizer file per DP rank, a ZeRO partition of one flat group per
param group; param_slice_mappings says where each parameter's piece starts in it. A parameter's
TP shard is its pieces in DP order (DeepSpeed cuts the flat group into consecutive partitions),
and the full tensor its TP shards merged as ds_to_universal merges them (layout.merge_tp).
"""
from collections import defaultdict
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
                for group in load(path).get("param_shapes") or []:
                    for name, shape in group.items():
                        self.shapes[(stage, rank, name)] = tuple(shape)
                        self.stage_of.setdefault(name, stage)
        self._stage, self._tensors = None, {}

    def _optimizer_files(self, mp_ranks: int) -> dict:
        found = {}
        for path in self.directory.iterdir():
            match = layout.OPTIM_FILE.match(path.name)
            if match:
                found[(int(match.group(1)), int(match.group(2)))] = path
        dp = len(found) // mp_ranks if found else 0
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
        if stage != self._stage:
            self._stage, self._tensors = stage, self._read_stage(stage)
        if n.optimizer not in self._tensors:
            raise BigScienceError(f"{self.directory}: the optimizer files of stage {stage} hold no {n.optimizer}")
        shards = self._tensors[n.optimizer]
        return {ours: layout.merge_tp([shards[rank][theirs] for rank in sorted(shards)], n.spec.split)
                for ours, theirs in zip(("master", "exp_avg", "exp_avg_sq"), layout.STATES)}

    def _read_stage(self, stage: int) -> dict:
        """optimizer name -> TP rank -> state -> TP shard, for every parameter of one stage."""
        tp = self.released.tp
        pieces = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for rank in range(tp):
            for dp in range(self.dp):
                path = self.optim[(dp, layout.mp_rank(stage, rank, tp))]
                for name, state, piece in _pieces(path):
                    pieces[name][rank][state].append(piece)
        out = {}
        for name, ranks in pieces.items():
            out[name] = {}
            for rank, states in ranks.items():
                shape = self.shapes.get((stage, rank, name))
                out[name][rank] = {state: torch.cat(parts).view(shape) for state, parts in states.items()}
        return out

    def adam_step(self, first) -> float:
        """Adam's step count, from the first optimizer file: its state, else its param groups."""
        base = _optimizer_state(self.optim[(0, 0)])["base_optimizer_state"]
        for holder in [*(base.get("state") or {}).values(), *(base.get("param_groups") or [])]:
            if "step" in holder:
                return float(holder["step"])
        raise BigScienceError(f"{self.optim[(0, 0)]}: no Adam step count in its optimizer state")


def _optimizer_state(path: Path) -> dict:
    state = load(path)
    optim = state.get("optimizer_state_dict") if isinstance(state, dict) else None
    if not isinstance(optim, dict) or "param_slice_mappings" not in optim:
        raise BigScienceError(f"{path}: not a ZeRO/BF16 optimizer file (no optimizer_state_dict.param_slice_mappings)")
    return optim


def _pieces(path: Path):
    """(optimizer name, DeepSpeed state name, this DP rank's piece) of every parameter in one file."""
    optim = _optimizer_state(path)
    flats = optim["single_partition_of_fp32_groups"]
    groups = optim["base_optimizer_state"]["state"]
    for index, mapping in enumerate(optim["param_slice_mappings"]):
        missing = [key for key in ("exp_avg", "exp_avg_sq") if key not in groups.get(index, {})]
        if missing:
            raise BigScienceError(f"{path}: param group {index} has no {missing[0]} (Adam's moments are needed)")
        flat = {"fp32": flats[index], **{key: groups[index][key] for key in ("exp_avg", "exp_avg_sq")}}
        for name, address in mapping.items():
            for state, tensor in flat.items():
                yield name, state, tensor.float().narrow(0, address.start, address.numel).clone()
