"""The time of one training step for a model, a layout and a cluster: the planner's performance model.

Every term is a mechanism with a documented cost; the few global constants at the bottom of this
docstring are the only tuned numbers, and the same constants serve every GPU, model and layout
(tests/test_performance.py checks them against published runs, which they were not fitted row by row to).

Notation: s sequence, b micro-batch, h hidden, f FFN width (4h), a heads, d = h/a, V padded vocab,
L layers (l per stage), t TP, p PP, n DP, m micro-batches per step = B / (b n), v interleaved
model chunks per stage (1 = plain 1F1B), byte width w (2 in 16 bits, 4 in fp32).

1. Matmuls, per layer, forward, per GPU (Narayanan et al. 2021, "Efficient Large-Scale Language
   Model Training on GPU Clusters Using Megatron-LM", Sec. 5 / Appendix, Eq. 3):
     QKV 2bs.h.3h/t, scores 2bs.s.h/t, context 2bs.s.h/t, dense 2bs.h.h/t, MLP 2 x 2bs.h.f/t,
   summing to 24bsh^2(1 + s/6h)/t at f = 4h. Backward runs two matmuls of the same FLOPs per
   forward one (2x): for a forward [bs x k] @ [k x n], the input gradient [bs x n] @ [n x k] and
   the weight gradient [n x bs] @ [bs x k], which sums over the micro-batch's bs tokens (a
   short micro-batch runs it further from peak: eta below). Full recomputation reruns the
   forward (+1x); selective recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
   Transformer Models", Sec. 4.2) reruns only the attention core (scores, softmax, dropout,
   context). The logits matmul 2bshV/t runs on the last stage, forward + backward (3x), never
   recomputed; the cross entropy behind it (training/model/vocab_loss.py, megatron's arithmetic
   a chunk at a time in fp32) passes over the bs V/t logits, LOSS_BYTES + 3w bytes per logit
   forward and backward: copies, max, exp and sums that stream at the memory's rate (HBM x
   ETA_HBM; on a CPU too: no tanh, no statistics per element). Hence Megatron's hardware FLOPs
   per step 96 B s L h^2 (1 + s/6h + V/16Lh) with full recompute (flops.py).
   Each matmul [m x k] @ [k x n] takes the roofline time
     max(2mnk / (peak x eta(n, k)),  w (mk + kn + mn) / (HBM x ETA_HBM))
   with the sustained fraction of the dense peak (the data sheet's, configs/hardware/)
     eta(n, k) = ETA_GEMM x n / (n + GEMM_HALF) x k / (k + GEMM_HALF)
   so a TP split (n or k divided by t) or a small head dimension (k = d for the scores) runs
   further from peak: tiles go unfilled and the fixed cost per output tile weighs more.
   The scores and context matmuls of a = heads/t batched heads, shape s x d x s, are memory-bound
   on every GPU here (intensity ~d FLOP/byte below the ridge): the roofline charges them their bytes.
2. Elementwise (memory-bound) work per layer, forward, in elements of width w, with u = sbh
   (sbh/t with sequence parallelism: Korthikanti Sec. 4.2.2), c = sbh/t, A = a s^2 b/t:
     two LayerNorms 2u + 2u, two bias-dropout-adds (read x and residual, write, 1-byte mask) 3.5u
     + 3.5u, Q/K/V and context layout copies 8c, fused bias-GeLU on 4c (read, write) 8c,
     fused scale-mask-softmax read + write 2A, attention dropout read, write and mask 2.5A
     (without dropout those terms vanish),
   at HBM x ETA_HBM: on GPUs these kernels are memory-bound. Where they are not (one CPU core
   computing tanh, exp and the LayerNorm statistics runs far below the memory's bandwidth), the
   catalogue entry gives their rate, `elementwise_gbs`, in the bytes counted here, and it replaces
   HBM x ETA_HBM for this section's terms (benchmarks/bench_plan_cpu.py measures it by running the
   model's own eager kernels, forward and backward, on one micro-batch). Backward moves ELEMENTWISE_BACKWARD times the forward's bytes (it reads the
   saved input and the incoming gradient and writes the outgoing one, LayerNorm twice).
3. Tensor-parallel collectives (Megatron's f/g operators, Shoeybi et al. 2019 Fig. 3): per layer
   2 all-reduces of b s h w bytes in forward and 2 in backward (2 more in a recomputed forward),
   or with sequence parallelism the same number of all-gather + reduce-scatter pairs, which
   move the same bytes (Korthikanti Sec. 4.2.2). A ring all-reduce over t ranks moves
   2(t-1)/t x bytes per rank (all-gather or reduce-scatter: (t-1)/t), at the link's one-way
   bandwidth x ETA_LINK: NVLink when the TP group is inside a node, else the per-GPU network.
   Each collective and each point-to-point message (section 4) also costs the catalogue's
   start-up latency (latency_us; 0 where absent: NCCL's microseconds on GPUs).
   Megatron runs them on the compute stream: fully exposed.
4. Pipeline (Narayanan et al. 2021, Sec. 2.2): with 1F1B and equal stages the step takes
     (m + (p - 1) / v) x (forward + backward of one micro-batch on one stage)
   so the bubble is (p-1)/(v m) of the ideal time ((p-1)/m without interleaving; the interleaved
   schedule with v chunks per stage divides it by v). Stages are not equal (the first holds the
   embedding, the last the logits and the loss, and a layer count that does not divide leaves
   some a layer more): the first micro-batch still crosses every stage, forward and backward,
   and the slowest stage paces the other m - 1, so with per-micro-batch stage times T the step
   takes
     m x T_slowest + (sum of the stages' T - T_slowest) / v,
   the line above when the stages are equal, and T_1 + ... + T_p for one micro-batch (each
   stage computes once while the others wait). Point-to-point sends of b s h w bytes per
   micro-batch forward and backward (v times as many with interleaving), split over the t TP
   ranks with Megatron's scatter-gather optimization (Narayanan Sec. 4.1), over the network when
   neighbouring stages sit on different nodes (TP fastest, then DP, then PP, as Megatron orders
   ranks: stage neighbours are t x n ranks apart), exposed. DeepSpeed's pipeline engine (this
   framework's, and BLOOM-176B's) sends the whole b s h activation from every TP rank (no
   scatter-gather); with sequence parallelism each rank's activation is already 1/t of it.
   Gradient accumulation: from the second micro-batch on, each micro-batch's gradients are added
   into the accumulation buffer, a memory-bound pass over the stage's parameters:
   ACCUMULATE_BYTES per parameter for 16-bit gradients (read both, write: autograd's +=),
   ACCUMULATE_FP32_BYTES with fp32 accumulation of bf16 gradients (read the bf16 gradient, read
   and write the fp32 buffer: DeepSpeed's grad_accum_dtype=fp32, as BLOOM-176B).
5. Data parallelism: the gradients (w' = 2 bytes per parameter, 4 for bf16 with fp32
   accumulation, as BLOOM-176B) are all-reduced over the n replicas after the last micro-batch:
   2(n-1)/n x bytes. ZeRO 1-2 then all-gather the updated parameters each rank owns ((n-1)/n x
   P w). Megatron's distributed optimizer reduce-scatters the gradients ((n-1)/n x bytes) in
   place of the all-reduce; DeepSpeed's ZeRO 1-2 all-reduce them whole and keep their partition
   (stage_1_and_2.py average_tensor with use_multi_rank_bucket_allreduce, its default; BLOOM-
   176B's BF16_Optimizer all-reduced too), then all-gather. Bandwidth: NVLink inside a node;
   across nodes the per-GPU network times the number of the group's ranks on one node (each GPU
   has its NIC, NCCL runs one ring per NIC). Overlap: PyTorch DDP (Megatron's DDP=torch rows) and ZeRO-2/3 with
   overlap_comm reduce buckets while the last micro-batch's backward runs (hiding up to that
   backward's time); Megatron's local DDP and DeepSpeed's pipeline engine reduce after the
   flush (exposed). ZeRO-3 also all-gathers the 16-bit parameters for each micro-batch's forward
   and backward (2(n-1)/n x P w per micro-batch), overlapped by prefetching with that
   micro-batch's compute up to ZERO3_OVERLAP of it. The tied embedding's gradient is all-reduced
   between the first and last stage (V h/t x w').
6. Optimizer: Adam with fp32 master weights is memory-bound: OPTIMIZER_BYTES bytes per parameter
   this GPU updates (P/t/p, / n under ZeRO >= 1) at HBM x ETA_HBM. DeepSpeed's ZeRO optimizer
   (stage_1_and_2.py; counted the same for ZeRO-3) also moves every gradient it holds, per step:
   it copies each local gradient into its reduction bucket (read w', write w'), and of the 1/n
   it owns it copies each into its partition (2w'), flattens them for the optimizer (2w'), and
   for the gradient norm converts each to fp64 and reads that (get_grad_norm_direct: w' + 8 + 8),
     local x (2w' + (5w' + 16) / n) bytes,
   at section 2's rate (HBM x ETA_HBM on a GPU; on a CPU the elementwise rate: the profile of a
   PP2 ZeRO-1 step there shows these per-tensor copies at 5-7 GB/s, as the elementwise kernels
   run, not the 20-50 GB/s of one streaming copy).

7. Processes that share compute (`solo_speedup`, optional, 1 for GPUs: each GPU computes alone on
   its own chip): the catalogue's rates are those each process sees while all the node's
   processes compute at once, and solo_speedup is how much faster one process computes while its
   peers wait. On CPUs it is 1 only when each process owns its core: SMT siblings, a shared power
   or turbo budget, or other jobs on the machine (the scheduler hands an idle peer's share of the
   cores to the process still running) make it larger. Under 1F1B the fill and drain slots run
   one stage alone, so their compute (the section 1-2 terms, not the communication) takes
   1/solo_speedup of the time; with m < p every slot is alone (alone_slots).
   benchmarks/bench_plan_cpu.py measures it in each launch (a process's matmul rate while its
   peer waits in gloo over its rate while both multiply): 1.0-1.05 on this project's 2-core
   machines when quiet, 1.8-2.1 while other jobs loaded them (2026-11-30).

Global constants, the same for every GPU, model and layout (tests/test_performance.py):
  ETA_GEMM = 0.72      the sustained share of the dense peak of a large fp16/bf16 GEMM inside a
                       training step (225 of 312 TFLOP/s on A100; isolated square cuBLAS GEMMs
                       reach 250-270, 80-87%, but a step's GEMMs are neither square nor alone:
                       clocks throttle under sustained load, launches and kernel tails).
                       THE ONE CONSTANT CHOSEN AGAINST THE PUBLISHED ROWS: with every other
                       constant fixed by its physical reference, 0.72 centres their errors
                       (0.84 over-predicts every row by 7-16%).
  GEMM_HALF = 40       the matrix dimension at which a GEMM dimension alone halves the
                       efficiency (tile width order: cuBLAS tiles are 64-256 wide).
  ETA_HBM = 0.80       share of the data sheet's HBM bandwidth streaming kernels reach
                       (STREAM-like copies on A100/H100: 80-90%).
  ETA_LINK = 0.75      NCCL bus bandwidth / one-way link bandwidth (nccl-tests all_reduce on
                       DGX A100: ~230 of 300 GB/s over NVLink; ~20 of 25 GB/s per HDR NIC).
  ELEMENTWISE_BACKWARD = 2
  OPTIMIZER_BYTES = 34 read p, m, v, g (fp32, 16 B), write p, m, v (12 B), write the 16-bit copy
                       (2 B), read g again for the gradient norm (4 B).
  ZERO3_OVERLAP = 0.5  share of a micro-batch's compute that hides ZeRO-3's gathers.
  ACCUMULATE_BYTES = 6, ACCUMULATE_FP32_BYTES = 10: counted bytes (section 4), not tuned.
  LOSS_BYTES = 72      counted passes of vocab_loss.py over each logit (section 1), not tuned:
                       forward: read the logit (w), write its fp32 copy (4), max (4), minus max
                       (8), exp (8), sum (4); backward: the copy again (w + 4), minus max (8),
                       exp (8), divide (8), times the loss gradient (8), the gradient written
                       over the logits (4 + w): 72 bytes and 3w.
  DeepSpeed's gradient copies (section 6) are counted from its code, not tuned.
"""
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from training.config.schema import RECOMPUTE
from training.plan.hardware import GPU

ETA_GEMM = 0.72
GEMM_HALF = 40.0
ETA_HBM = 0.80
ETA_LINK = 0.75
ELEMENTWISE_BACKWARD = 2.0
OPTIMIZER_BYTES = 34.0
ZERO3_OVERLAP = 0.5
ACCUMULATE_BYTES = 6.0
ACCUMULATE_FP32_BYTES = 10.0
LOSS_BYTES = 72.0
ENGINES = ("megatron", "deepspeed")


@dataclass(frozen=True)
class Shape:
    """A GPT-shaped model: BLOOM's, or any published run's."""
    hidden: int
    layers: int
    heads: int
    vocab: int  # padded
    seq: int
    ffn: Optional[int] = None  # 4 x hidden when None
    attention_dropout: bool = True
    hidden_dropout: bool = True

    @property
    def f(self) -> int:
        return self.ffn or 4 * self.hidden

    def parameters(self) -> float:
        h = self.hidden
        return self.vocab * h + self.layers * (4 * h * h + 2 * h * self.f + 9 * h + self.f) + 4 * h


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    recompute: str = "full"
    sequence_parallel: bool = False
    zero_stage: int = 1
    precision: str = "bf16"
    chunks: int = 1  # v: model chunks per stage (interleaved 1F1B); 1 = plain 1F1B
    # Whether the DP gradient reduction overlaps the last backward; None: decided by the engine
    # (section 5): true for ZeRO-2/3 without pipelining, false otherwise.
    dp_overlap: Optional[bool] = None
    layers_per_stage: Optional[tuple] = None  # None: as parallelism/pipeline_partition splits them

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)


@dataclass
class Prediction:
    step_time_s: float
    tflops_per_gpu: float  # model FLOPs (3 passes), as MFU counts them
    hardware_tflops_per_gpu: float  # Megatron's count, recompute included
    mfu: float
    tokens_per_sec: float
    bubble: float  # share of the step the slowest stage idles in fill and drain
    exposed_comm_s: float
    parts_s: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["parts_s"] = {k: round(v, 6) for k, v in self.parts_s.items()}
        return out


def _eta(n: float, k: float) -> float:
    return ETA_GEMM * n / (n + GEMM_HALF) * k / (k + GEMM_HALF)


def gemm_time(m: float, n: float, k: float, gpu: GPU, peak_tflops: float, width: int, count: float = 1) -> float:
    """Roofline time of `count` [m x k] @ [k x n] matmuls (section 1)."""
    compute = 2 * m * n * k / (peak_tflops * 1e12 * _eta(n, k))
    memory = width * (m * k + k * n + m * n) / (gpu.hbm_gbs * 1e9 * ETA_HBM)
    return count * max(compute, memory)


def _hbm_time(nbytes: float, gpu: GPU) -> float:
    return nbytes / (gpu.hbm_gbs * 1e9 * ETA_HBM)


def _elementwise_time(nbytes: float, gpu: GPU) -> float:
    """Section 2's kernels: at the memory's rate, or at the catalogue's elementwise_gbs where they
    are compute-bound (a CPU core)."""
    return _hbm_time(nbytes, gpu) if gpu.elementwise_gbs is None else nbytes / (gpu.elementwise_gbs * 1e9)


def _link_gbs(gpu: GPU, inside_node: bool, ranks_per_node: int = 1) -> float:
    if inside_node:
        return gpu.nvlink_one_way_gbs * ETA_LINK
    return gpu.network_gbs * max(1, ranks_per_node) * ETA_LINK


def allreduce_time(nbytes: float, ranks: int, gbs: float, latency_s: float = 0.0) -> float:
    """A ring all-reduce (section 3), plus the catalogue's start-up latency (latency_us)."""
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * nbytes / (gbs * 1e9) + latency_s


def allgather_time(nbytes: float, ranks: int, gbs: float, latency_s: float = 0.0) -> float:
    """A ring all-gather (or reduce-scatter) of nbytes in all: half an all-reduce's traffic."""
    return 0.0 if ranks <= 1 else (ranks - 1) / ranks * nbytes / (gbs * 1e9) + latency_s


def layer_times(shape: Shape, lay: Layout, gpu: GPU, peak: float, width: int) -> Dict[str, float]:
    """Forward times of one block for one micro-batch on one GPU: matmuls, attention core, elementwise."""
    s, b, h, t, f = shape.seq, lay.micro_batch, shape.hidden, lay.tp, shape.f
    d = h // shape.heads
    heads = shape.heads / t
    tokens = s * b
    shapes = ((3 * h / t, h), (h, h / t), (f / t, h), (h, f / t))  # QKV, attention dense, h->4h, 4h->h
    dense = [linear_times(tokens, n, k, gpu, peak, width) for n, k in shapes]
    core_mm = (gemm_time(s, s, d, gpu, peak, width, heads * b)  # scores q k^T
               + gemm_time(s, d, s, gpu, peak, width, heads * b))  # context probs v
    A = heads * s * s * b
    core_ew = (2 * A + (2.5 * A if shape.attention_dropout else 0)) * width
    u = tokens * h / (t if lay.sequence_parallel else 1)
    c = tokens * h / t
    hidden_dropout = 1.0 if shape.hidden_dropout else 0.0
    ew = (4 * u + 2 * (2.5 + hidden_dropout) * u + 8 * c + 8 * c) * width
    return {"dense": sum(fw for fw, _ in dense), "dense_backward": sum(bw for _, bw in dense),
            "core": core_mm + _elementwise_time(core_ew, gpu), "elementwise": _elementwise_time(ew, gpu)}


def linear_times(tokens: float, n: float, k: float, gpu: GPU, peak: float, width: int) -> tuple:
    """(forward, backward) of a linear layer [tokens x k] @ [k x n]: backward is the input gradient
    [tokens x n] @ [n x k] and the weight gradient [n x tokens] @ [tokens x k] (section 1), as
    Megatron computes it (grad_output^T @ input)."""
    backward = gemm_time(tokens, k, n, gpu, peak, width) + gemm_time(n, k, tokens, gpu, peak, width)
    return gemm_time(tokens, n, k, gpu, peak, width), backward


def predict(shape: Shape, lay: Layout, gpu: GPU, gpus_per_node: Optional[int] = None,
            engine: str = "megatron") -> Prediction:
    """One training step's time and rates; see the module docstring for each term."""
    from training.plan.flops import megatron_flops

    if engine not in ENGINES:
        raise ValueError(f"engine={engine} is not one of {', '.join(ENGINES)}")
    if lay.recompute not in RECOMPUTE:
        raise ValueError(f"recompute={lay.recompute} is not one of {', '.join(RECOMPUTE)}")
    peak = gpu.peak(lay.precision)
    if not peak:
        raise ValueError(f"{gpu.name} has no {lay.precision} peak in the hardware catalogue")
    node = gpus_per_node or gpu.gpus_per_node
    width = 4 if lay.precision == "fp32" else 2
    grad_width = 2 if lay.precision == "fp16" else 4
    s, b, h, t, p, n, v = shape.seq, lay.micro_batch, shape.hidden, lay.tp, lay.pp, lay.dp, lay.chunks
    m = lay.micro_batches
    parts: Dict[str, float] = {}

    fwd = layer_times(shape, lay, gpu, peak, width)
    layer_fwd = fwd["dense"] + fwd["core"] + fwd["elementwise"]
    # backward: the dense layers' two gradient matmuls, twice every other forward term;
    # recomputation reruns what it drops
    rerun = {"none": 0.0, "selective": fwd["core"], "full": layer_fwd}[lay.recompute]
    layer_fwd_bwd = (fwd["dense"] + fwd["dense_backward"] + fwd["core"] * 3
                     + fwd["elementwise"] * (1 + ELEMENTWISE_BACKWARD) + rerun)
    # TP collectives: 4 all-reduce-sized transfers per layer (+2 recomputed with full)
    tp_inside = t <= node
    collectives = 4 + (2 if lay.recompute == "full" else 0)
    tp_layer = collectives * allreduce_time(s * b * h * width, t, _link_gbs(gpu, tp_inside), gpu.latency_s)

    counts = list(lay.layers_per_stage) if lay.layers_per_stage else _split(shape.layers, p)
    logits = sum(linear_times(s * b, shape.vocab / t, h, gpu, peak, width))
    logits += _hbm_time(s * b * shape.vocab / t * (LOSS_BYTES + 3 * width), gpu)  # cross entropy
    stage_times = []
    for i, layers in enumerate(counts):
        time = layers * (layer_fwd_bwd + tp_layer)
        if i == len(counts) - 1:
            time += logits
        stage_times.append(time)
    slowest = max(stage_times)
    parts["compute_per_microbatch"] = max(counts) * layer_fwd_bwd + (logits if stage_times.index(slowest) == p - 1 else 0)
    parts["tp_comm_per_microbatch"] = max(counts) * tp_layer

    # pipeline p2p: forward activation and backward gradient per micro-batch (and per chunk)
    p2p = 0.0
    if p > 1:
        pp_inside = t * n < node
        split = t if (engine == "megatron" or lay.sequence_parallel) else 1
        p2p = 2 * v * ((s * b * h * width / split) / (_link_gbs(gpu, pp_inside) * 1e9) + gpu.latency_s)
    # gradient accumulation: every micro-batch after the first adds its gradients into the buffer
    local = max(stage_params(shape, counts, t))
    accumulate = local * (ACCUMULATE_FP32_BYTES if grad_width == 4 else ACCUMULATE_BYTES)
    accumulate_time = _hbm_time(accumulate, gpu) * (m - 1) / m
    parts["grad_accumulation_per_microbatch"] = accumulate_time
    slots = [time + p2p + accumulate_time for time in stage_times]
    pipeline_time = m * max(slots) + (sum(slots) - max(slots)) / v
    pipeline_time -= alone_slots(lay, m) * parts["compute_per_microbatch"] * (1 - 1 / gpu.solo_speedup)
    bubble = ((p - 1) / v) / (m + (p - 1) / v)

    # data parallel
    dp_inside = t * n <= node
    dp_gbs = _link_gbs(gpu, dp_inside, ranks_per_node=min(n, max(1, node // t)))
    dp_time = allreduce_time(local * grad_width, n, dp_gbs, gpu.latency_s)
    if 1 <= lay.zero_stage <= 2:
        # megatron reduce-scatters the gradients, DeepSpeed all-reduces them; both then
        # all-gather the updated parameters (section 5)
        reduce = dp_time / 2 if engine == "megatron" else dp_time
        dp_time = reduce + allgather_time(local * width, n, dp_gbs, gpu.latency_s)
    ds_copies = 0.0
    if engine == "deepspeed" and lay.zero_stage >= 1:
        ds_copies = _elementwise_time(local * (2 * grad_width + (5 * grad_width + 16) / n), gpu)  # section 6
    overlap = lay.dp_overlap if lay.dp_overlap is not None else (lay.zero_stage >= 2 and p == 1)
    last_backward = slowest * 2 / 3
    dp_exposed = max(0.0, dp_time - last_backward) if overlap else dp_time
    zero3 = 0.0
    if lay.zero_stage >= 3 and n > 1:
        gathers = 2 * allgather_time(local * width, n, dp_gbs) * m
        zero3 = max(0.0, gathers - ZERO3_OVERLAP * slowest * m)
    tied = 0.0
    if p > 1:
        tied = allreduce_time(shape.vocab * h / t * grad_width, 2, _link_gbs(gpu, t * n * p <= node), gpu.latency_s)
    optimizer = _hbm_time(local / (n if lay.zero_stage >= 1 else 1) * OPTIMIZER_BYTES, gpu)

    step = pipeline_time + dp_exposed + zero3 + tied + optimizer + ds_copies
    parts.update(pipeline_s=pipeline_time, p2p_per_microbatch=p2p, dp_exposed_s=dp_exposed,
                 dp_total_s=dp_time, zero3_exposed_s=zero3, tied_embedding_s=tied, optimizer_s=optimizer,
                 zero_copies_s=ds_copies)
    exposed = (m * parts["tp_comm_per_microbatch"] + (m + (p - 1) / v) * p2p + dp_exposed + zero3 + tied)

    hw_flops = megatron_flops(shape.hidden, shape.layers, s, shape.vocab, lay.global_batch, shape.f, passes=4
                              if lay.recompute == "full" else 3)
    model_flops = megatron_flops(shape.hidden, shape.layers, s, shape.vocab, lay.global_batch, shape.f, passes=3)
    world = lay.world
    tflops = model_flops / (step * world * 1e12)
    return Prediction(
        step_time_s=step, tflops_per_gpu=tflops, hardware_tflops_per_gpu=hw_flops / (step * world * 1e12),
        mfu=tflops / peak, tokens_per_sec=lay.global_batch * s / step, bubble=bubble,
        exposed_comm_s=exposed, parts_s=parts)


def alone_slots(lay: Layout, m: int) -> float:
    """Micro-batch slots (section 4) in which a stage computes while the node's other processes do
    not (section 7): all of them for one process; under 1F1B the fill and the drain, 2(p - 1)
    slots of the m + p - 1 (all of them when m < p: no two stages ever compute at once)."""
    if lay.world == 1:
        return m
    if lay.pp == 1:
        return 0.0
    slots = m + (lay.pp - 1) / lay.chunks
    return min(slots, 2 * (lay.pp - 1) / lay.chunks) if m >= lay.pp else slots


def _split(layers: int, pp: int) -> list:
    from parallelism.pipeline_partition import stage_layer_counts

    return stage_layer_counts(layers, pp)


def stage_params(shape: Shape, counts, tp: int) -> list:
    """Parameters one GPU of each stage holds (embedding on the first and, tied, the last)."""
    h, f = shape.hidden, shape.f
    block = (4 * h * h + 2 * h * f) / tp + 9 * h + f
    embed = shape.vocab * h / tp
    out = []
    for i, layers in enumerate(counts):
        params = layers * block
        if i == 0 or i == len(counts) - 1:
            params += embed
        out.append(params)
    return out


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

