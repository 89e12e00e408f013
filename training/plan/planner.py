"""The layout planner behind `bloom-plan` and `trainer.dry_run=true`.

For a model and a cluster (launcher.nodes x launcher.gpus_per_node of launcher.gpu_type) it
enumerates every layout this framework's engine can run: TP x PP x DP = world size (TP divides
the heads and the FFN width; PP at most the layers), micro-batch (powers of two dividing the
global batch per replica, and every batch of the rampup), recompute none / selective / full,
sequence parallelism (TP > 1, seq divisible by TP), ZeRO stage (0-3; 16-bit training needs >= 1,
pipelining allows <= 1: DeepSpeed's rules, training/config/checks.py). It keeps the layouts whose
memory estimate (memory_estimate.py, worst stage) fits in (1 - MEMORY_MARGIN) of the GPU's
memory, predicts each one's step (performance.py, DeepSpeed's pipeline engine: no interleaving,
whole p2p sends, the DP reduction after the flush), and ranks them by tokens per second.
"""
import dataclasses
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from data.batch_schedule import BatchSchedule
from data.errors import DataError
from parallelism.layout import Layout as Topology
from training.config.loader import load_config
from training.model.shapes import ffn_size, padded_vocab_size
from training.plan.hardware import GPU, load_gpu
from training.plan.memory_estimate import estimate
from training.config.schema import RECOMPUTE, ConfigError, RootConfig
from training.plan.performance import Layout, Prediction, Shape, predict

MEMORY_MARGIN = 0.10  # keep 10% of the GPU's memory free: allocator fragmentation, NCCL buffers grow
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
ENGINE = "deepspeed"  # this framework's pipeline engine (section 4 of performance.py)


@dataclass
class Candidate:
    layout: Layout
    prediction: Prediction
    memory_gib: float

    def key(self) -> tuple:
        lay = self.layout
        return (lay.tp, lay.pp, lay.dp, lay.micro_batch, lay.recompute, lay.sequence_parallel, lay.zero_stage)


def cluster_size(cfg: RootConfig, gpu: GPU) -> tuple:
    """(world size, GPUs per node) the plan is for."""
    per_node = cfg.launcher.nproc_per_node or cfg.launcher.gpus_per_node or (
        gpu.gpus_per_node if gpu.name != "cpu" else 1)
    return cfg.launcher.nodes * per_node, per_node


def model_shape(cfg: RootConfig, tp: int) -> Shape:
    m = cfg.model
    return Shape(m.hidden_size, m.num_layers, m.num_heads, padded_vocab_size(m, tp), cfg.data.seq_length,
                 ffn_size(m), m.attention_dropout > 0, m.hidden_dropout > 0)


def usable_memory_gib(gpu: GPU, per_node: int) -> float:
    """Memory one process may plan with: the GPU's, or a CPU node's host memory shared by its processes."""
    total = gpu.memory_gib / per_node if gpu.name == "cpu" else gpu.memory_gib
    return total * (1 - MEMORY_MARGIN)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _schedule(cfg: RootConfig, micro: int, dp: int) -> Optional[BatchSchedule]:
    t = cfg.trainer
    try:
        return BatchSchedule(t.global_batch_size, micro, dp, tuple(t.rampup_batch_size) or None)
    except DataError:
        return None


def layouts(cfg: RootConfig, world: int, precision: str):
    """Every (tp, pp, dp, micro, recompute, sp, zero) this engine can run on `world` processes."""
    m, seq = cfg.model, cfg.data.seq_length
    for tp in _divisors(world):
        if m.num_heads % tp or ffn_size(m) % tp or padded_vocab_size(m, tp) % tp:
            continue
        for pp in _divisors(world // tp):
            if pp > m.num_layers:
                continue
            dp = world // (tp * pp)
            for micro in MICRO_BATCHES:
                if _schedule(cfg, micro, dp) is None:
                    continue
                for recompute in RECOMPUTE:
                    for sp in ((False, True) if tp > 1 and seq % tp == 0 else (False,)):
                        for zero in range(4):
                            if precision != "fp32" and zero < 1 or pp > 1 and zero > 1:
                                continue
                            yield Layout(tp, pp, dp, micro, cfg.trainer.global_batch_size, recompute, sp,
                                         zero, precision)


def memory_gib(cfg: RootConfig, lay: Layout) -> float:
    model = dataclasses.replace(cfg.model, recompute=lay.recompute)
    stages = estimate(model, Topology(lay.tp, lay.pp, lay.dp), lay.precision, lay.zero_stage, cfg.data.seq_length,
                      lay.micro_batch, lay.micro_batches, lay.sequence_parallel, cfg.parallel)
    return max(s.total for s in stages)


def evaluate(cfg: RootConfig, lay: Layout, gpu: GPU, per_node: int) -> Candidate:
    shape = model_shape(cfg, lay.tp)
    return Candidate(lay, predict(shape, lay, gpu, per_node, engine=ENGINE), memory_gib(cfg, lay))


@dataclass
class PlanResult:
    gpu: GPU
    world: int
    per_node: int
    budget_gib: float
    ranked: List[Candidate]  # fitting, fastest first
    considered: int
    configured: Optional[Candidate]
    configured_rank: Optional[int]  # 1-based among the fitting ones; None if it does not fit / is invalid
    seconds: float


def configured_layout(cfg: RootConfig, world: int) -> Optional[Layout]:
    p, t = cfg.parallel, cfg.trainer
    if world % (p.tp * p.pp):
        return None
    return Layout(p.tp, p.pp, world // (p.tp * p.pp), t.micro_batch_size, t.global_batch_size, cfg.model.recompute,
                  p.sequence_parallel, p.zero_stage, t.precision)


def plan(cfg: RootConfig) -> PlanResult:
    """Rank every fitting layout; one ConfigError for an unknown GPU, a world size no layout can
    use, or a model that fits nowhere on this cluster (naming the smallest one where it fits)."""
    started = time.perf_counter()
    gpu = load_gpu(cfg.launcher.gpu_type)
    precision = cfg.trainer.precision
    if not gpu.peak(precision):
        usable = [p for p, v in gpu.peak_tflops.items() if v]
        raise ConfigError(f"trainer.precision={precision} has no peak rate on launcher.gpu_type={gpu.name} "
                          f"(it has {', '.join(usable)})")
    world, per_node = cluster_size(cfg, gpu)
    budget = usable_memory_gib(gpu, per_node)
    candidates = list(layouts(cfg, world, precision))
    if not candidates:
        raise ConfigError(
            f"no layout of {cfg.model.name} uses world size {world} ({cfg.launcher.nodes} nodes x {per_node}): "
            f"TP must divide the {cfg.model.num_heads} heads, PP at most the {cfg.model.num_layers} layers, and "
            f"micro-batch x DP divide every global batch ({cfg.trainer.global_batch_size}"
            f"{', rampup ' + str(list(cfg.trainer.rampup_batch_size)) if cfg.trainer.rampup_batch_size else ''})")
    fitting = []
    for lay in candidates:
        mem = memory_gib(cfg, lay)
        if mem <= budget:
            fitting.append(Candidate(lay, predict(model_shape(cfg, lay.tp), lay, gpu, per_node, engine=ENGINE), mem))
    if not fitting:
        raise ConfigError(nothing_fits_message(cfg, gpu, world, per_node, budget))
    fitting.sort(key=lambda c: (-c.prediction.tokens_per_sec, c.memory_gib))
    configured, rank = None, None
    lay = configured_layout(cfg, world)
    if lay is not None:
        ranks = {c.key(): i + 1 for i, c in enumerate(fitting)}
        try:
            configured = evaluate(cfg, lay, gpu, per_node)
            rank = ranks.get(configured.key())
        except (ValueError, ZeroDivisionError):
            configured = None
    return PlanResult(gpu, world, per_node, budget, fitting, len(candidates), configured, rank,
                      time.perf_counter() - started)


def _smallest_memory(cfg: RootConfig, world: int, precision: str) -> Optional[float]:
    best = None
    for lay in layouts(cfg, world, precision):
        if lay.micro_batch != 1 or lay.recompute != "full":
            continue
        mem = memory_gib(cfg, lay)
        best = mem if best is None else min(best, mem)
    return best


def nothing_fits_message(cfg: RootConfig, gpu: GPU, world: int, per_node: int, budget: float) -> str:
    smallest = _smallest_memory(cfg, world, cfg.trainer.precision)
    head = (f"{cfg.model.name} fits no layout on {cfg.launcher.nodes} x {per_node} {gpu.name}: the smallest "
            f"needs {smallest:.1f} GiB per GPU, {budget:.1f} GiB usable ({gpu.memory_gib:g} GiB less "
            f"{MEMORY_MARGIN:.0%} margin)")
    for nodes in (2 ** k for k in range(0, 13)):
        if nodes <= cfg.launcher.nodes:
            continue
        mem = _smallest_memory(cfg, nodes * per_node, cfg.trainer.precision)
        if mem is not None and mem <= budget:
            return f"{head}; the smallest cluster of {gpu.name} that fits it: {nodes} nodes x {per_node} (launcher.nodes={nodes})"
    return f"{head}; no cluster up to 4096 nodes of {gpu.name} fits it"


def run_duration(cfg: RootConfig, lay: Layout, gpu: GPU, per_node: int) -> Dict[str, float]:
    """Wall time and GPU-hours for trainer.train_samples (or train_iters), batch rampup included:
    each rampup batch size is predicted at its own size (fewer micro-batches, a larger bubble)."""
    t = cfg.trainer
    schedule = BatchSchedule(t.global_batch_size, lay.micro_batch, lay.dp, tuple(t.rampup_batch_size) or None)
    shape = model_shape(cfg, lay.tp)
    step_of = {}

    def step_time(size: int) -> float:
        if size not in step_of:
            step_of[size] = predict(shape, dataclasses.replace(lay, global_batch=size), gpu, per_node,
                                    engine=ENGINE).step_time_s
        return step_of[size]

    seconds, consumed, steps = 0.0, 0, 0
    end = schedule.rampup_end()
    target = t.train_samples if t.train_samples else (t.train_iters or 0) * t.global_batch_size
    while consumed < min(end, target):
        size = schedule.global_batch(consumed)
        seconds += step_time(size)
        consumed += size
        steps += 1
    if consumed < target:
        rest = -(-(target - consumed) // t.global_batch_size)
        seconds += rest * step_time(t.global_batch_size)
        steps += rest
        consumed += rest * t.global_batch_size
    world = lay.world
    return {"samples": consumed, "steps": steps, "seconds": seconds, "days": seconds / 86400,
            "gpu_hours": seconds * world / 3600, "rampup_steps": min(steps, schedule.steps_to_rampup_end())}


def apply_auto(cfg: RootConfig) -> Candidate:
    """parallel.auto=true: put the planner's winner into the config (layout, micro-batch,
    recompute, sequence parallelism, ZeRO stage); one ConfigError when nothing fits."""
    winner = plan(cfg).ranked[0]
    lay = winner.layout
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp = lay.tp, lay.pp, lay.dp
    cfg.parallel.sequence_parallel, cfg.parallel.zero_stage = lay.sequence_parallel, lay.zero_stage
    cfg.trainer.micro_batch_size = lay.micro_batch
    cfg.model.recompute = lay.recompute
    return winner


def load_planned_config(overrides=()) -> RootConfig:
    """The config a command runs: load_config's, with the planner's winner put in when
    parallel.auto=true. Every rank and every launcher plans the same config, so all run the same
    winner."""
    cfg = load_config(overrides)
    if cfg.parallel.auto:
        apply_auto(cfg)
    return cfg
