"""The run plan: what a config will build and run, checked and sized before any process starts.

`bloom-train ... trainer.dry_run=true` prints it and writes run_dir/plan.json.
"""
import dataclasses
import json
from pathlib import Path

from parallelism.pipeline_partition import stage_layer_counts
from parallelism.layout import Layout
from training.config.checks import batch_schedule, procs_per_node
from training.config.schema import ConfigError, ModelConfig, RootConfig
from training.plan.hardware import load_gpu
from training.plan.memory_estimate import estimate
from training.model.bloom import build_model
from training.model.shapes import ffn_size, padded_vocab_size
from training.model.param_table import Shape, iter_parameters, numel


def count_parameters_as_built(cfg: ModelConfig, tp: int) -> int:
    """Parameters of the whole model (all TP ranks together, padded vocabulary included), counted
    on a model built on the meta device: no memory. Needs megatron's parallel_state at TP=1."""
    whole = dataclasses.replace(cfg, padded_vocab_size=padded_vocab_size(cfg, tp))
    model = build_model(whole, seed=0, meta=True)
    return sum(p.numel() for p in model.parameters())


def count_parameters_from_table(cfg: ModelConfig, tp: int) -> int:
    shape = Shape(cfg.hidden_size, ffn_size(cfg), padded_vocab_size(cfg, tp))
    return sum(numel(spec.shape(shape)) for _, _, spec, _ in iter_parameters(cfg.num_layers))


def make_plan(cfg: RootConfig, layout: Layout) -> dict:
    schedule = batch_schedule(cfg, layout.dp)
    t = cfg.trainer
    stages = estimate(cfg.model, layout, t.precision, cfg.parallel.zero_stage, cfg.data.seq_length,
                      t.micro_batch_size, schedule.num_micro_batches(10 ** 18), cfg.parallel.sequence_parallel,
                      cfg.parallel)
    worst = max(stages, key=lambda s: s.total)
    gpu = load_gpu(cfg.launcher.gpu_type)
    # A CPU "GPU" is host memory that a node's processes share.
    gpu_gib = gpu.memory_gib / (procs_per_node(cfg) if gpu.name == "cpu" else 1)
    return {
        "model": cfg.model.name,
        "parameters": count_parameters_as_built(cfg.model, layout.tp),
        "padded_vocab_size": padded_vocab_size(cfg.model, layout.tp),
        "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": layout.world_size,
        "nodes": cfg.launcher.nodes, "procs_per_node": procs_per_node(cfg),
        "gpu_type": cfg.launcher.gpu_type,
        "zero_stage": cfg.parallel.zero_stage, "precision": t.precision,
        "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size,
        "rampup_batch_size": list(t.rampup_batch_size),
        "micro_batches_per_step": schedule.num_micro_batches(10 ** 18),
        "seq_length": cfg.data.seq_length,
        "layers_per_stage": stage_layer_counts(cfg.model.num_layers, layout.pp),
        "recompute": cfg.model.recompute,
        "sequence_parallel": cfg.parallel.sequence_parallel,
        "memory_per_gpu_gib": {
            "weights": round(worst.weights, 3), "gradients": round(worst.gradients, 3),
            "optimizer": round(worst.optimizer, 3), "activations": round(worst.activations, 3),
            "overhead": round(worst.overhead, 3), "total": round(worst.total, 3),
            "worst_stage": worst.stage, "gpu_memory_gib": gpu_gib,
            "fits": worst.total <= gpu_gib,
            "formula": "see training/plan/memory_estimate.py",
        },
        "stages": [s.as_dict() for s in stages],
        "performance": performance_section(cfg),
    }


def performance_section(cfg: RootConfig) -> dict:
    """The planner's prediction for this layout and where it ranks (the engine of bloom-plan)."""
    from training.plan.plan_report import describe, prediction_json
    from training.plan.planner import plan

    try:
        result = plan(cfg)
    except ConfigError as error:
        return {"error": str(error)}
    winner = result.ranked[0]
    out = prediction_json(cfg, result.configured, result) if result.configured else {}
    out.update(winner=describe(winner), winner_tokens_per_sec=winner.prediction.tokens_per_sec,
               winner_gain=(winner.prediction.tokens_per_sec / result.configured.prediction.tokens_per_sec - 1)
               if result.configured else None)
    return out


def format_plan(plan: dict) -> str:
    mem = plan["memory_per_gpu_gib"]
    fits = "fits" if mem["fits"] else "DOES NOT FIT"
    lines = [
        f"model        {plan['model']}: {plan['parameters']:,} parameters (vocab padded to {plan['padded_vocab_size']:,})",
        f"layout       TP {plan['tp']} x PP {plan['pp']} x DP {plan['dp']} = {plan['world_size']} processes "
        f"({plan['nodes']} nodes x {plan['procs_per_node']} {plan['gpu_type']}), ZeRO-{plan['zero_stage']}, {plan['precision']}",
        f"batch        micro {plan['micro_batch_size']}, global {plan['global_batch_size']} "
        f"({plan['micro_batches_per_step']} micro-batches per step), rampup {plan['rampup_batch_size'] or 'none'}, seq {plan['seq_length']}",
        f"stages       blocks per stage {plan['layers_per_stage']}, recompute {plan['recompute']}, "
        f"sequence parallel {plan['sequence_parallel']}",
        f"memory/GPU   {mem['total']:.1f} GiB on stage {mem['worst_stage']} (weights {mem['weights']:.1f}, grads {mem['gradients']:.1f}, "
        f"optimizer {mem['optimizer']:.1f}, activations {mem['activations']:.1f}, overhead {mem['overhead']:.1f}) "
        f"of {mem['gpu_memory_gib']:g} GiB: {fits}",
    ]
    perf = plan.get("performance", {})
    if "error" in perf:
        lines.append(f"performance  {perf['error']}")
    elif perf:
        rank = f"rank {perf['rank']} of {perf['candidates_fitting']} fitting layouts" if perf["rank"] else "not among the fitting layouts"
        lines.append(f"performance  predicted {perf['tflops_per_gpu']:.3g} TFLOPs/GPU (MFU {perf['mfu']:.1%}), "
                     f"{perf['tokens_per_sec']:,.0f} tokens/s, {perf['step_time_s']:.3f} s per step, bubble {perf['bubble']:.1%}; "
                     f"{rank}; the best: {perf['winner']} ({perf['winner_gain']:+.1%}); bloom-plan shows the ranking")
    return "\n".join(lines)


def write_plan(plan: dict, run_dir: str) -> Path:
    path = Path(run_dir) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    tmp.replace(path)
    return path
