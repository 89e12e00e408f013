"""Our checkpoint -> a Megatron-DeepSpeed global_stepN folder at a chosen TP x PP (DP 1), with the
fp32 masters and Adam's moments in BF16-optimizer files, as BigScience's BLOOM runs saved them, so
that DeepSpeed's own ds_to_universal converts it and Megatron-DeepSpeed tooling reads it.

    OUT/global_stepN/...   (training/bigscience/layout.py)
    OUT/latest             "global_stepN", as DeepSpeed writes it

DP is 1: each (pp, tp) optimizer file holds the whole flat group of its stage and TP rank (a
ZeRO partition over one rank). Layer files hold the weights in the run's precision (bf16 for a
bf16 run, as BLOOM's); the optimizer files hold the fp32 masters, which is what a continuation reads.
"""
import argparse
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import torch

from training.bigscience import layout
from training.checkpoint.files import verify
from training.checkpoint.fragments import MASTER, FragmentReader
from training.checkpoint.saved_model import open_checkpoint, saved_config
from training.model.param_table import MDS_EMBEDDING_LAYER, Part, megatron_deepspeed_names, mds_final_layer

LAYER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ExportError(ValueError):
    """A checkpoint that cannot be written in Megatron-DeepSpeed's layout; one line."""


def export_megatron_deepspeed(checkpoint, out, tp: int = 1, pp: int = 1) -> Path:
    """Write `checkpoint` as OUT/global_step<iteration>; returns that folder."""
    directory, manifest, shape = open_checkpoint(checkpoint)
    _check_layout(shape, tp, pp)
    if not any(f.startswith("optim/") and f.endswith(".safetensors") for f in manifest["files"]):
        raise ExportError(f"{directory} holds no optimizer state (an import from Hugging Face weights, or "
                          "saved without it): Megatron-DeepSpeed's optimizer files need Adam's moments")
    verify(directory)
    state = json.loads((directory / "trainer_state.json").read_text())
    meta = json.loads((directory / "optim" / "meta.json").read_text())
    config = saved_config(directory) or {}
    final = Path(out) / f"global_step{state['iteration']}"
    if final.exists():
        raise ExportError(f"{final} already exists: remove it or choose another OUT")
    staging = final.parent / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    readers = {kind: FragmentReader(directory, manifest, kind) for kind in ("model", "optim")}
    args = megatron_args(shape, state, config, manifest.get("precision", "fp32"), tp, pp)
    names = megatron_deepspeed_names(shape["num_layers"])
    for stage, (first, end) in enumerate(layout.stage_blocks(shape["num_layers"], pp)):
        on_stage = [n for n in names if _on_stage(n, stage, pp, first, end)]
        for rank in range(tp):
            shards = {n.optimizer: _shards(readers, n, rank, tp) for n in on_stage}
            _write_layers(staging, on_stage, shards, rank, shape["num_layers"], stage, pp,
                          LAYER_DTYPES.get(manifest.get("precision"), torch.float32))
            mp = layout.mp_rank(stage, rank, tp)
            torch.save(_optimizer_file(on_stage, shards, meta, config), staging / layout.optim_file(0, mp))
            torch.save(_model_states(on_stage, shards, args, state, shape, tp, pp), staging / layout.model_states_file(mp))
    for reader in readers.values():
        reader.close()
    staging.rename(final)
    (final.parent / "latest").write_text(final.name)
    return final


def _check_layout(shape: dict, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ExportError(f"--tp {tp} --pp {pp}: both must be at least 1")
    for what, size in (("num_heads", shape["num_heads"]), ("padded_vocab_size", shape["padded_vocab_size"]),
                       ("ffn_hidden_size", shape["ffn_hidden_size"])):
        if size % tp:
            raise ExportError(f"--tp {tp} does not divide the model's {what} ({size})")
    if pp > shape["num_layers"]:
        raise ExportError(f"--pp {pp} is more stages than the model's {shape['num_layers']} blocks")


def _on_stage(n, stage: int, pp: int, first: int, end: int) -> bool:
    """The tied embedding lives on the first and the last stage, as DeepSpeed's TiedLayerSpec does."""
    if n.spec.part is Part.EMBEDDING:
        return stage in (0, pp - 1)
    if n.spec.part is Part.FINAL:
        return stage == pp - 1
    return first + 3 <= n.layer < end + 3


def _shards(readers: dict, n, rank: int, tp: int) -> dict:
    """One TP rank's shard of the master and both moments (replicated parameters: whole)."""
    out = {"fp32": readers["model"].tp_shard(n.name, MASTER, rank, tp)}
    for state in ("exp_avg", "exp_avg_sq"):
        out[state] = readers["optim"].tp_shard(n.name, state, rank, tp)
    return out


def _write_layers(staging: Path, on_stage: list, shards: dict, rank: int, num_layers: int, stage: int,
                  pp: int, dtype) -> None:
    """layer_XX-model_YY-model_states.pt for each pipeline layer of this stage; the last stage also
    writes the tied embedding as layer L + 5 (its output projection), as DeepSpeed's pipeline does."""
    layers = {}
    for n in on_stage:
        layers.setdefault(n.layer, OrderedDict())[n.local] = shards[n.optimizer]["fp32"].to(dtype).clone()
    for layer, tensors in layers.items():
        if layer == MDS_EMBEDDING_LAYER and stage == 0:
            torch.save(tensors, staging / layout.layer_file(layer, rank))
        elif layer != MDS_EMBEDDING_LAYER:
            torch.save(tensors, staging / layout.layer_file(layer, rank))
    if stage == pp - 1:
        torch.save(layers[MDS_EMBEDDING_LAYER], staging / layout.layer_file(mds_final_layer(num_layers) + 1, rank))


def _optimizer_file(on_stage: list, shards: dict, meta: dict, config: dict) -> dict:
    """What DeepSpeed's BF16_Optimizer.state_dict() holds, over one DP rank and one param group."""
    from deepspeed.utils.tensor_fragment import fragment_address
    from deepspeed import __version__ as ds_version

    mappings, start = OrderedDict(), 0
    for n in on_stage:
        numel = shards[n.optimizer]["fp32"].numel()
        mappings[n.optimizer] = fragment_address(numel=numel, start=start)
        start += numel
    flat = {state: torch.cat([shards[n.optimizer][state].reshape(-1) for n in on_stage]) for state in layout.STATES}
    optim = config.get("optim", {})
    group = {"lr": optim.get("lr", 0.0), "betas": (optim.get("beta1", 0.9), optim.get("beta2", 0.95)),
             "eps": optim.get("eps", 1e-8), "weight_decay": optim.get("weight_decay", 0.0), "params": [0]}
    step = torch.tensor(float(meta.get("adam_step", 0.0)))
    return {"optimizer_state_dict": {
        "clip_grad": optim.get("clip_grad", 1.0),
        "base_optimizer_state": {"state": {0: {"step": step, "exp_avg": flat["exp_avg"],
                                               "exp_avg_sq": flat["exp_avg_sq"]}},
                                 "param_groups": [group]},
        "single_partition_of_fp32_groups": [flat["fp32"]], "group_paddings": [0], "partition_count": [1],
        "ds_version": ds_version, "param_slice_mappings": [mappings]},
        "ds_config": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "ds_version": ds_version}


def _model_states(on_stage: list, shards: dict, args, state: dict, shape: dict, tp: int, pp: int) -> dict:
    """DeepSpeed's mp_rank file of a pipeline engine (module None: the layers have their own files)
    with Megatron's client state (args, iteration, tokens) and the universal-checkpoint info."""
    from deepspeed import __version__ as ds_version
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_VALUE

    shapes = OrderedDict((n.optimizer, shards[n.optimizer]["fp32"].shape) for n in on_stage)
    return {"module": None, "buffer_names": [], "optimizer": None, "param_shapes": [shapes],
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
            "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": [],
            "skipped_steps": 0, "global_steps": state["iteration"], "global_samples": state["consumed_samples"],
            "dp_world_size": 1, "mp_world_size": tp,
            layout.PARALLEL_DIMS: {"pp_degree": pp, "tp_degree": tp},
            "ds_config": {"bf16": {"enabled": True}}, "ds_version": ds_version,
            "args": args, "checkpoint_version": 3.0, "iteration": state["iteration"],
            "tokens": state.get("consumed_tokens", 0), "checkpoint_info": {},
            layout.UC_INFO: layout.universal_info(shape["num_layers"], shape["padded_vocab_size"],
                                                  UNIVERSAL_CHECKPOINT_VERSION_VALUE)}


def megatron_args(shape: dict, state: dict, config: dict, precision: str, tp: int, pp: int) -> argparse.Namespace:
    """Megatron's args for this model under Megatron-DeepSpeed's names (BigScience's BLOOM
    flags: embedding LayerNorm, ALiBi); vocab_size is the tokenizer's, which Megatron keeps in
    its tokenizer rather than its args."""
    model, optim = config.get("model", {}), config.get("optim", {})
    trainer, data = config.get("trainer", {}), config.get("data", {})
    return argparse.Namespace(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=1, world_size=tp * pp,
        num_layers=shape["num_layers"], hidden_size=shape["hidden_size"], ffn_hidden_size=shape["ffn_hidden_size"],
        num_attention_heads=shape["num_heads"], padded_vocab_size=shape["padded_vocab_size"],
        vocab_size=shape["vocab_size"], layernorm_epsilon=shape["layer_norm_epsilon"],
        init_method_std=model.get("init_std", 0.02), hidden_dropout=model.get("hidden_dropout", 0.1),
        attention_dropout=model.get("attention_dropout", 0.1), embed_layernorm=True,
        seq_length=data.get("seq_length"), micro_batch_size=trainer.get("micro_batch_size"),
        global_batch_size=trainer.get("global_batch_size"), seed=trainer.get("seed", 42),
        lr=optim.get("lr"), min_lr=optim.get("min_lr"), adam_beta1=optim.get("beta1"), adam_beta2=optim.get("beta2"),
        adam_eps=optim.get("eps"), weight_decay=optim.get("weight_decay"), clip_grad=optim.get("clip_grad"),
        bf16=precision == "bf16", fp16=precision == "fp16", iteration=state["iteration"],
        consumed_train_samples=state["consumed_samples"], consumed_train_tokens=state.get("consumed_tokens", 0))

