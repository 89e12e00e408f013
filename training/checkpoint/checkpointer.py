"""Saving and loading a running DeepSpeed engine in the layout-independent format of
training/checkpoint/files.py, so a checkpoint saved at one TP x PP x DP loads at any other.

What a checkpoint holds: the fp32 master weights and Adam's moments of every parameter (gathered
over DP from ZeRO's partitions with DeepSpeed's safe_get_full_* helpers, TP shards kept as saved),
Adam's step count and the fp16 loss-scaler state, the loop state (iteration, consumed samples and
tokens: the LR schedule and the batch rampup are functions of consumed samples), every rank's RNG
states, the resolved config and the tokenizer.
"""
import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state)
from megatron.core import parallel_state

from parallelism.pipeline import canonical_name
from training.checkpoint import files
from training.config.loader import ConfigError
from training.model.bloom import ffn_size, padded_vocab_size
from training.model.param_table import shard_tensor

ADAM_STATES = ("exp_avg", "exp_avg_sq")
# Fault injection for the tests: SIGKILL this process in the middle of saving this iteration.
KILL_DURING_SAVE_ENV = "BLOOM_TEST_KILL_DURING_SAVE"


def model_shape(cfg, tp: int) -> dict:
    m = cfg.model
    return {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
            "vocab_size": m.vocab_size, "padded_vocab_size": padded_vocab_size(m, tp),
            "ffn_hidden_size": ffn_size(m), "layer_norm_epsilon": m.layer_norm_epsilon}


def check_same_model(saved: dict, current: dict, directory: Path) -> None:
    """Refuse a checkpoint of another model. The padded vocabulary counts: its extra rows' logits
    enter the softmax, so a model with other padding is another function (pin
    model.padded_vocab_size, as BLOOM pins 250880, to move a checkpoint between TP sizes)."""
    for key in ("hidden_size", "num_layers", "num_heads", "vocab_size", "ffn_hidden_size"):
        if saved.get(key) != current[key]:
            raise ConfigError(
                f"checkpoint {directory} holds a model with {key}={saved.get(key)} but this config "
                f"builds {key}={current[key]}: the model shape cannot change on resume")
    rows = saved.get("padded_vocab_size")
    if rows is not None and rows != current["padded_vocab_size"]:
        raise ConfigError(
            f"checkpoint {directory} has {rows} vocabulary rows but this config builds "
            f"{current['padded_vocab_size']} (model.padded_vocab_size, or the vocabulary padded to a "
            f"multiple of 128 x TP): set model.padded_vocab_size={rows} to continue the same model")


class Checkpointer:
    def __init__(self, cfg, layout, engine, tokenizer_dir: Optional[Path] = None):
        self.cfg, self.layout, self.engine = cfg, layout, engine
        self.root = Path(cfg.trainer.run_dir) / "checkpoints"
        self.tokenizer_dir = tokenizer_dir
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.params = self._local_parameters()

    # -- which parameters this rank holds, under canonical names ------------------------------

    def _local_parameters(self) -> list:
        module = self.engine.module
        named = list(module.named_parameters())
        if not self.engine.pipelined:
            return named
        layers = self.cfg.model.num_layers
        return [(canonical_name(name, layers), p) for name, p in named]

    def _writes_shard(self, name: str) -> bool:
        """One rank writes each shard: DP rank 0, and for the tied embedding the first stage."""
        if self.dp_rank != 0:
            return False
        return not (name == "word_embeddings.weight" and self.layout.pp > 1 and self.pp_rank != 0)

    # -- optimizer state access, whatever DeepSpeed wrapped around our AdamW ------------------

    def _zero(self) -> bool:
        """ZeRO's optimizer holds the fp32 masters and Adam state (stages 1-2 link each parameter
        to them with `_hp_mapping`, stage 3 with `ds_id`); DeepSpeed's safe_* helpers read both."""
        first = self.params[0][1]
        return hasattr(first, "_hp_mapping") or self._zero3()

    def _zero3(self) -> bool:
        return hasattr(self.params[0][1], "ds_id")

    def _ensure_adam_state(self) -> None:
        """Adam creates its moments at the first step; a checkpoint loaded before any step needs
        them now, zero, with step 0 (what the first step would have found)."""
        base, zero = self.engine.optimizer, self.engine.engine.optimizer
        if self._zero3():
            targets = zero.fp32_partitioned_groups_flat
        elif self._zero():
            targets = _flat_fp32_partitions(zero)
        else:
            targets = [p for _, p in self.params]
        for tensor in targets:
            if not base.state.get(tensor):
                base.state[tensor] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(tensor, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(tensor, memory_format=torch.preserve_format)}
        if self._zero() and not self._zero3():
            # DeepSpeed links each parameter to its Adam state once, after the first step of the
            # first group, so later groups stay unlinked; link again now that every state exists.
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _get(self, param, key: Optional[str]) -> torch.Tensor:
        """The fp32 master weight (key None) or an Adam moment of one parameter, whole over DP."""
        if self._zero():
            value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
            return value.detach().float().cpu()
        if key is None:
            return param.detach().float().cpu()
        return self.engine.optimizer.state[param][key].detach().float().cpu()

    def _set(self, param, key: Optional[str], value: torch.Tensor) -> None:
        value = value.to(param.device)
        if self._zero():
            if key is None:
                safe_set_full_fp32_param(param, value)
                if not self._zero3():  # stage 3's partitions are refreshed all at once, after
                    with torch.no_grad():
                        param.copy_(value.to(param.dtype))
            else:
                safe_set_full_optimizer_state(param, value, key)
        elif key is None:
            with torch.no_grad():
                param.copy_(value)
        else:
            self.engine.optimizer.state[param][key].copy_(value)

    def _adam_step(self) -> float:
        for state in self.engine.optimizer.state.values():
            if "step" in state:
                return float(state["step"])
        return 0.0

    def _set_adam_step(self, step: float) -> None:
        for state in self.engine.optimizer.state.values():
            state["step"] = torch.tensor(float(step))

    def _loss_scaler(self):
        return getattr(self.engine.engine.optimizer, "loss_scaler", None)

    # -- saving ------------------------------------------------------------------------------

    def save(self, loop_state) -> Path:
        final = files.iteration_dir(self.root, loop_state.iteration)
        staging = files.staging_dir(final)
        if dist.get_rank() == 0:
            for stale in self.root.glob(".iter_*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        self._write_tensors(staging)
        self._write_rng(staging)
        self._maybe_die_for_test(loop_state.iteration)
        dist.barrier()
        if dist.get_rank() == 0:
            self._write_rank0_files(staging, loop_state)
            files.finalize(staging, final, self._manifest(loop_state))
            self._prune()
        dist.barrier()
        return final

    def _write_tensors(self, staging: Path) -> None:
        if self._has_moments():
            self._ensure_adam_state()
        model, optim = {}, {}
        for name, param in self.params:
            master = self._get(param, None)
            moments = {key: self._get(param, key) for key in ADAM_STATES} if self._has_moments() else {}
            if self._writes_shard(name):
                model[name] = master
                optim.update({f"{name}/{key}": value for key, value in moments.items()})
        if model:
            files.write_tensors(staging / files.shard_file("model", self.tp_rank, self.pp_rank), model)
        if optim:
            files.write_tensors(staging / files.shard_file("optim", self.tp_rank, self.pp_rank), optim)

    def _has_moments(self) -> bool:
        return self._adam_step() > 0

    def _write_rng(self, staging: Path) -> None:
        path = staging / "rng" / f"rank{dist.get_rank():05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(self.engine), path)

    def _write_rank0_files(self, staging: Path, loop_state) -> None:
        scaler = self._loss_scaler()
        scaler_state = {k: getattr(scaler, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter",
                                                       "cur_hysteresis") if scaler and hasattr(scaler, k)}
        files.write_json(staging / "optim" / "meta.json",
                         {"adam_step": self._adam_step(), "loss_scaler": scaler_state})
        files.write_json(staging / "trainer_state.json", {
            "iteration": loop_state.iteration, "consumed_samples": loop_state.consumed_samples,
            "consumed_tokens": loop_state.consumed_tokens})
        from training.config.loader import to_yaml

        (staging / "config.yaml").write_text(to_yaml(self.cfg))
        if self.tokenizer_dir and Path(self.tokenizer_dir).is_dir():
            shutil.copytree(self.tokenizer_dir, staging / "tokenizer")

    def _manifest(self, loop_state) -> dict:
        layout = self.layout
        return {"iteration": loop_state.iteration, "model": model_shape(self.cfg, layout.tp),
                "saved_layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
                "precision": self.cfg.trainer.precision}

    def _prune(self) -> None:
        keep = self.cfg.trainer.keep_checkpoints
        complete = files.complete_checkpoints(self.root)
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def _maybe_die_for_test(self, iteration: int) -> None:
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(iteration) and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    # -- loading -----------------------------------------------------------------------------

    def candidates(self, resume: str) -> list:
        """Checkpoints to try, best first: `latest` then older ones (auto), or the one given."""
        if resume == "none":
            return []
        if resume != "auto":
            path = Path(resume)
            latest = files.resolve_latest(path)
            return [latest] if latest else [path]
        complete = list(reversed(files.complete_checkpoints(self.root)))
        latest = files.resolve_latest(self.root)
        if latest in complete:
            complete.remove(latest)
            complete.insert(0, latest)
        return complete

    def choose(self, resume: str, say) -> Optional[Path]:
        """The checkpoint every rank will load: rank 0 verifies checksums, falling back to older
        ones when a checkpoint is corrupt, and tells the others."""
        choice = [None]
        if dist.get_rank() == 0:
            for directory in self.candidates(resume):
                try:
                    files.verify(directory)
                    choice = [str(directory)]
                    break
                except files.CheckpointError as error:
                    say(f"checkpoint unusable: {error}; trying an older one")
            if resume not in ("auto", "none") and choice[0] is None:
                choice = ["!" + f"trainer.resume={resume}: no usable checkpoint there"]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] and choice[0].startswith("!"):
            raise ConfigError(choice[0][1:])
        return Path(choice[0]) if choice[0] else None

    def load(self, directory: Path) -> dict:
        """Restore weights, optimizer state and RNG from `directory`; returns its trainer state."""
        manifest = files.read_manifest(directory)
        check_same_model(manifest["model"], model_shape(self.cfg, self.layout.tp), directory)
        names = [name for name, _ in self.params]
        padded = padded_vocab_size(self.cfg.model, self.layout.tp)
        weights = files.read_full_tensors(directory, "model", names)
        has_optim = any(f.startswith("optim/") and f.endswith(".safetensors") for f in manifest["files"])
        meta = json.loads((Path(directory) / "optim" / "meta.json").read_text()) if has_optim else {}
        self._ensure_adam_state()
        for name, param in self.params:
            self._set(param, None, self._shard(weights[name], name, padded))
        if self._zero3():
            self._refresh_zero3_weights()
        if has_optim:
            for key in ADAM_STATES:
                moments = files.read_full_tensors(directory, "optim", names, suffix=f"/{key}")
                for name, param in self.params:
                    self._set(param, key, self._shard(moments[name], name, padded))
            self._set_adam_step(meta.get("adam_step", 0.0))
            self._restore_scaler(meta.get("loss_scaler", {}))
        same_layout = manifest["saved_layout"] == {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}
        rng_file = Path(directory) / "rng" / f"rank{dist.get_rank():05d}.pt"
        if same_layout and rng_file.is_file():
            set_rng_state(self.engine, torch.load(rng_file, weights_only=True))
        state = json.loads((Path(directory) / "trainer_state.json").read_text())
        state["same_layout"] = same_layout
        return state

    def _refresh_zero3_weights(self) -> None:
        """Stage 3 keeps each rank's slice of the 16-bit weights apart from the fp32 masters: copy
        the loaded masters into those slices, then regather the parameters it keeps whole
        ("persistent"), as DeepSpeed does after each optimizer step."""
        zero = self.engine.engine.optimizer
        for group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(group)
        if zero.persistent_parameters:
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)

    def _shard(self, full: torch.Tensor, name: str, padded_vocab: int) -> torch.Tensor:
        return shard_tensor(full, files.split_of(name), self.tp_rank, self.layout.tp, padded_vocab).contiguous()

    def _restore_scaler(self, saved: dict) -> None:
        scaler = self._loss_scaler()
        for key, value in saved.items():
            if scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, value)


def _flat_fp32_partitions(zero) -> list:
    """The flat fp32 partitions Adam steps on. DeepSpeed's ZeRO-1/2 optimizer calls them
    single_partition_of_fp32_groups; in bf16 with fp32 gradient accumulation at ZeRO-1 (BLOOM-176B's
    recipe) DeepSpeed runs its BF16_Optimizer instead, which calls them fp32_groups_flat_partition."""
    if hasattr(zero, "single_partition_of_fp32_groups"):
        return zero.single_partition_of_fp32_groups
    return zero.fp32_groups_flat_partition


def rng_state(engine) -> dict:
    """Every random stream this rank draws from, as tensors, ints and lists (weights_only-safe)."""
    version, keys, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [version, list(keys), gauss],
             "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
             "torch": torch.get_rng_state(), "tp": engine.tp_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(engine, state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    engine.set_tp_rng_state(state["tp"])
