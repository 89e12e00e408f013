"""What bloom-plan prints: the ranked table, why the winner wins, the configured layout's rank,
and the run's duration and GPU-hours; and the one JSON object of `--json`."""
from typing import List, Optional

from training.config.schema import RootConfig
from training.plan.planner import MEMORY_MARGIN, Candidate, PlanResult, run_duration


def describe(c: Candidate) -> str:
    lay = c.layout
    return (f"TP {lay.tp} x PP {lay.pp} x DP {lay.dp}, micro {lay.micro_batch}, recompute {lay.recompute}"
            f"{', SP' if lay.sequence_parallel else ''}, ZeRO-{lay.zero_stage}")


def breakdown(c: Candidate) -> dict:
    """Seconds of one step: compute (all micro-batches on the slowest stage), pipeline bubble,
    exposed communication, and the rest (gradient accumulation, optimizer)."""
    p = c.prediction
    m = c.layout.micro_batches
    compute = m * p.parts_s["compute_per_microbatch"]
    bubble = p.bubble * p.parts_s["pipeline_s"]
    comm = p.exposed_comm_s
    return {"compute": compute, "bubble": bubble, "exposed communication": comm,
            "other": max(0.0, p.step_time_s - compute - bubble - comm)}


def why(winner: Candidate, other: Candidate, label: str) -> str:
    gain = winner.prediction.tokens_per_sec / other.prediction.tokens_per_sec - 1
    a, b = breakdown(winner), breakdown(other)
    saved = sorted(((b[k] - a[k], k) for k in a), key=lambda x: -abs(x[0]))
    parts = [f"{'saves' if delta > 0 else 'spends'} {abs(delta):.2f} s on {k} ({a[k]:.2f} vs {b[k]:.2f})"
             for delta, k in saved if abs(delta) > 0.005 * other.prediction.step_time_s]
    reason = ", ".join(parts[:3]) or "the same step time within 0.5%"
    return (f"#1 vs {label} ({describe(other)}): {gain:+.1%} tokens/s: per step it {reason}; "
            f"memory {winner.memory_gib:.1f} vs {other.memory_gib:.1f} GiB")


def table(rows: List[Candidate], start: int = 1) -> List[str]:
    head = (f"{'#':>3}  {'layout (TP x PP x DP)':<21} {'micro':>5} {'recompute':<9} {'SP':<3} {'ZeRO':>4} "
            f"{'TFLOPs/GPU':>10} {'MFU':>6} {'tokens/s':>10} {'mem GiB':>8} {'bubble':>7} {'exp.comm':>8} {'step s':>8}")
    lines = [head]
    for i, c in enumerate(rows, start):
        lay, p = c.layout, c.prediction
        comm = p.exposed_comm_s / p.step_time_s
        lines.append(f"{i:>3}  {f'{lay.tp} x {lay.pp} x {lay.dp}':<21} {lay.micro_batch:>5} {lay.recompute:<9} "
                     f"{'on' if lay.sequence_parallel else 'off':<3} {lay.zero_stage:>4} {p.tflops_per_gpu:>10.1f} "
                     f"{p.mfu:>6.1%} {p.tokens_per_sec:>10,.0f} {c.memory_gib:>8.1f} {p.bubble:>7.1%} {comm:>8.1%} "
                     f"{p.step_time_s:>8.3f}")
    return lines


def format_report(cfg: RootConfig, result: PlanResult, top: int = 10) -> str:
    gpu = result.gpu
    winner = result.ranked[0]
    lines = [
        f"bloom-plan: {cfg.model.name} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"seq {cfg.data.seq_length}, global batch {cfg.trainer.global_batch_size}, {cfg.trainer.precision}) on "
        f"{cfg.launcher.nodes} x {result.per_node} {gpu.name} = {result.world} GPUs",
        f"{result.considered} layouts considered, {len(result.ranked)} fit in {result.budget_gib:.1f} GiB per GPU "
        f"({gpu.memory_gib:g} GiB less a {MEMORY_MARGIN:.0%} margin); ranked by predicted tokens/s "
        f"(TFLOPs/GPU and MFU count model FLOPs, no recompute; peak {gpu.peak(cfg.trainer.precision):g} TFLOP/s)",
    ]
    lines += table(result.ranked[:top])
    if len(result.ranked) > 1:
        lines.append("why: " + why(winner, result.ranked[1], "#2"))
    if result.configured is not None:
        c = result.configured
        if result.configured_rank is not None:
            where = f"rank {result.configured_rank} of {len(result.ranked)}"
        else:
            where = (f"does not fit ({c.memory_gib:.1f} GiB > {result.budget_gib:.1f})"
                     if c.memory_gib > result.budget_gib else "not a layout this engine runs")
        lines.append(f"configured: {describe(c)}: {where}, {c.prediction.tflops_per_gpu:.1f} TFLOPs/GPU, "
                     f"{c.prediction.tokens_per_sec:,.0f} tokens/s; the winner's predicted gain "
                     f"{winner.prediction.tokens_per_sec / c.prediction.tokens_per_sec - 1:+.1%}")
        if result.configured_rank not in (None, 1):
            lines.append("why: " + why(winner, c, "configured"))
    run = run_duration(cfg, winner.layout, gpu, result.per_node)
    if run["samples"]:
        lines.append(f"run: {run['samples']:,} samples in {run['steps']:,} steps ({run['rampup_steps']:,} in the batch "
                     f"rampup): {run['days']:.1f} days, {run['gpu_hours']:,.0f} GPU-hours with the winner")
    lines.append(f"planned in {result.seconds:.2f} s; apply with: parallel.tp={winner.layout.tp} "
                 f"parallel.pp={winner.layout.pp} trainer.micro_batch_size={winner.layout.micro_batch} "
                 f"model.recompute={winner.layout.recompute} parallel.sequence_parallel="
                 f"{str(winner.layout.sequence_parallel).lower()} parallel.zero_stage={winner.layout.zero_stage} "
                 "(or parallel.auto=true)")
    return "\n".join(lines)


def prediction_json(cfg: RootConfig, c: Candidate, result: Optional[PlanResult]) -> dict:
    lay, p = c.layout, c.prediction
    out = {
        "model": cfg.model.name, "gpu_type": result.gpu.name if result else cfg.launcher.gpu_type,
        "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "micro_batch_size": lay.micro_batch,
        "global_batch_size": lay.global_batch, "recompute": lay.recompute,
        "sequence_parallel": lay.sequence_parallel, "zero_stage": lay.zero_stage, "precision": lay.precision,
        "step_time_s": p.step_time_s, "tflops_per_gpu": p.tflops_per_gpu,
        "hardware_tflops_per_gpu": p.hardware_tflops_per_gpu, "mfu": p.mfu, "tokens_per_sec": p.tokens_per_sec,
        "memory_per_gpu_gib": c.memory_gib, "bubble": p.bubble, "exposed_comm_s": p.exposed_comm_s,
        "parts_s": p.parts_s,
    }
    if result is not None:
        out["fits"] = c.memory_gib <= result.budget_gib
        out["rank"] = result.configured_rank
        out["candidates_fitting"] = len(result.ranked)
    return out
