"""Each part of the memory estimate against what a DeepSpeed run really holds, on every rank for its
own pipeline stage (training/plan/memory_estimate.py, within 10%), one launch per layout: DP2 fp32
at ZeRO 1, 2, 3; DP2 bf16 at ZeRO 1, 2 and 3; TP2 and PP2 fp32 at ZeRO 1; the recompute choices spread
over them (the engine runs each of none, selective and full, in fp32 and bf16).

Measured in each launch, during one real training step of 2 micro-batches per rank (4 at PP2):
- weights: the engine's parameter tensors (ZeRO-3: the partitions DeepSpeed keeps in ds_tensor and
  the small weights it keeps whole);
- optimizer: the ZeRO optimizer's fp32 partition and Adam moments;
- gradients: the peak, over the points where DeepSpeed's optimizer takes over the gradients (its
  reduction epilogues and its step), of the distinct storages behind every parameter's .grad and
  every gradient buffer the optimizer holds (its reduce buckets, partitions, fp32 accumulation);
  the reduce bucket is set to 4M elements so the buckets and the gradients both weigh;
- activations: the bytes autograd saves for backward in each block call of the engine's forward
  (torch.autograd.graph.saved_tensors_hooks, distinct storages, parameters excluded, plus the
  inputs torch's checkpoint holds for its rerun, as tests/test_recompute.py counts them), and, at
  the launch's TP, a block of each recompute choice in fp32 and bf16 counted the same way;
- the logits the loss keeps for its backward on the last stage (each loss call's saved bytes);
- at PP2, the peak number of micro-batches whose forward ran and backward has not (the 1F1B
  schedule's in-flight micro-batches, counted on DeepSpeed's own instructions), which must be the
  estimate's, and that many micro-batches' block activations against the estimate's.
"""
import json
import statistics

import pytest
import torch
import torch.distributed as dist

from parallelism.topology import Layout
from tests.multiprocess import run_processes

TOLERANCE = 0.10
SHAPE = ["model.hidden_size=256", "data.seq_length=128", "parallel.reduce_bucket_size=4000000"]
CASES = [(Layout(1, 1, 2), 1, "fp32", "none"), (Layout(1, 1, 2), 2, "fp32", "selective"),
         (Layout(1, 1, 2), 3, "fp32", "full"), (Layout(1, 1, 2), 1, "bf16", "full"),
         (Layout(1, 1, 2), 2, "bf16", "none"), (Layout(1, 1, 2), 3, "bf16", "selective"),
         (Layout(2, 1, 1), 1, "fp32", "selective"),
         (Layout(1, 2, 1), 1, "fp32", "none")]
GRADIENT_POINTS = ("step", "reduce_gradients", "backward_epilogue", "overlapping_partition_gradients_reduce_epilogue",
                   "independent_gradient_partition_epilogue", "update_hp_grads")


def _storage(t):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _tensors(obj, depth=0):
    """Tensors an optimizer attribute holds: directly, in lists and dicts, in DeepSpeed's buckets."""
    if torch.is_tensor(obj):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)
    elif depth < 3 and isinstance(getattr(obj, "buffer", None), list):  # stage_1_and_2's ipg bucket
        yield from _tensors(obj.buffer, depth + 1)


class GradientPeak:
    """Peak bytes of gradient storages, sampled where DeepSpeed's optimizer takes the gradients over."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer, self.peak = module, optimizer, 0
        for name in GRADIENT_POINTS:
            real = getattr(optimizer, name, None)
            if callable(real):
                setattr(optimizer, name, self._sampling(real))

    def _sampling(self, real):
        def sampled(*args, **kwargs):
            self.sample()
            result = real(*args, **kwargs)
            self.sample()
            return result
        return sampled

    def sample(self):
        held = dict(_storage(p.grad) for p in self.module.parameters() if p.grad is not None)
        for name, value in vars(self.optimizer).items():
            if "grad" in name.lower() or "ipg" in name.lower():
                held.update(_storage(t) for t in _tensors(value) if t.numel())
        self.peak = max(self.peak, sum(held.values()))


class SavedPerBlock:
    """Bytes autograd saves in each call of each block (distinct storages, parameters excluded),
    and the inputs torch's checkpoint holds for its rerun."""

    def __init__(self, model):
        import training.model.bloom as bloom

        self.calls, self.current, self.block = [], None, None
        for block in (m for m in model.modules() if isinstance(m, bloom.BloomBlock)):
            block.register_forward_pre_hook(self._enter)
            block.register_forward_hook(self._leave)
        real = bloom.checkpoint

        def checkpoint_counting_inputs(fn, *args, **kwargs):
            for arg in args:
                if torch.is_tensor(arg):
                    self.add(arg)
            return real(fn, *args, **kwargs)
        bloom.checkpoint = checkpoint_counting_inputs  # this worker process only

    def _enter(self, block, args):
        self.block, self.current = block, {}

    def _leave(self, block, args, output):
        self.calls.append(sum(self.current.values()))
        self.current = None

    def add(self, tensor):
        if self.current is not None:
            ptr, nbytes = _storage(tensor)
            # the block's weights as they are now: ZeRO-3 gathers each layer's just before it runs
            if ptr not in {p.untyped_storage().data_ptr() for p in self.block.parameters()}:
                self.current[ptr] = nbytes
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t)


class SavedByLoss:
    """Bytes the loss keeps for its backward in each call (the logits, with the targets and two
    floats per token): the distinct storages it hands to save_for_backward (autograd packs a custom
    function's saved tensors after its forward returns, so the block counter's hooks cannot scope it)."""

    def __init__(self):
        from training.model.vocab_loss import ChunkedVocabParallelCrossEntropy as Loss

        self.calls = []
        real = Loss.forward

        def counted(ctx, *args):
            save = ctx.save_for_backward

            def counting_save(*tensors):
                self.calls.append(sum(dict(_storage(t) for t in tensors if torch.is_tensor(t)).values()))
                return save(*tensors)
            ctx.save_for_backward = counting_save
            return real(ctx, *args)
        Loss.forward = staticmethod(counted)  # this worker process only


class InFlight:
    """Micro-batches whose forward ran and backward has not, on DeepSpeed's pipeline instructions."""

    def __init__(self):
        from deepspeed.runtime.pipe import schedule
        from deepspeed.runtime.pipe.engine import PipelineEngine

        self.now = self.peak = 0
        table = PipelineEngine._INSTRUCTION_MAP  # this worker process only
        forward, backward = table[schedule.ForwardPass], table[schedule.BackwardPass]

        def counted_forward(engine, *args, **kwargs):
            self.now += 1
            self.peak = max(self.peak, self.now)
            return forward(engine, *args, **kwargs)

        def counted_backward(engine, *args, **kwargs):
            result = backward(engine, *args, **kwargs)
            self.now -= 1
            return result
        table[schedule.ForwardPass], table[schedule.BackwardPass] = counted_forward, counted_backward


def _standalone_blocks(model_cfg, tp_size: int, seq: int, micro: int) -> dict:
    """{recompute-precision: (counted, estimated)} for one block of each choice at this TP."""
    import dataclasses

    from parallelism.tensor_parallel import tensor_parallel_from_state
    from training.model.bloom import make_block
    from training.model.kernels import select_kernels
    from training.plan.memory_estimate import per_layer_activation_bytes

    tp = tensor_parallel_from_state(7, torch.device("cpu"))
    kernels = select_kernels(model_cfg.kernels, torch.device("cpu"), model_cfg.attention_dropout)
    out = {}
    for recompute in ("none", "selective", "full"):
        for precision, dtype, width in (("fp32", torch.float32, 4), ("bf16", torch.bfloat16, 2)):
            cfg = dataclasses.replace(model_cfg, recompute=recompute)
            block = make_block(cfg, tp, kernels, 7, 0).to(dtype)
            counter = SavedPerBlock(block)
            x = torch.randn(micro, seq, cfg.hidden_size, dtype=dtype, requires_grad=True)
            with counter.hooks():
                y = block(x)
            y.float().sum().backward()
            # on CPU torch's dropout keeps its mask at the value width (memory_estimate's docstring)
            estimated = per_layer_activation_bytes(cfg, tp_size, seq, micro, recompute, width, width)
            out[f"{recompute}-{precision}"] = (counter.calls[0], estimated)
    return out


def _measure(rank, layout, zero, precision, recompute, out):
    from megatron.core import parallel_state

    from tests.train_steps import make_engine, train
    from training.plan.memory_estimate import estimate, in_flight as estimated_in_flight, kept_logits_bytes
    from training.plan.memory_estimate import per_layer_activation_bytes

    cfg, engine = make_engine(SHAPE + [f"parallel.zero_stage={zero}", f"trainer.precision={precision}",
                                       f"model.recompute={recompute}", f"parallel.tp={layout.tp}",
                                       f"parallel.pp={layout.pp}"], layout)
    ds = engine.engine
    opt = ds.optimizer
    gradients = GradientPeak(ds.module, opt)
    saved = SavedPerBlock(ds.module)
    loss = SavedByLoss()
    in_flight = InFlight() if layout.pp > 1 else None
    with saved.hooks():
        train(cfg, engine, layout, 0, 1)
    weights = 0
    for p in ds.module.parameters():
        part = getattr(p, "ds_tensor", None)
        held = part if (part is not None and p.data.numel() == 0) else p.data
        weights += held.numel() * held.element_size()
    # ZeRO-1/2: stage_1_and_2's fp32 partition; ZeRO-3: stage3's; bf16 at ZeRO-1: BF16_Optimizer's
    master = next(getattr(opt, name) for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                                                  "fp32_groups_flat_partition") if getattr(opt, name, None))
    optimizer = sum(t.numel() * t.element_size() for t in master)
    optimizer += sum(v.numel() * v.element_size() for s in opt.optimizer.state.values() for v in s.values()
                     if torch.is_tensor(v) and v.dim() > 0)
    t = cfg.trainer
    micro_batches = t.global_batch_size // (t.micro_batch_size * layout.dp)
    stage_index = parallel_state.get_pipeline_model_parallel_rank()
    stage = estimate(cfg.model, layout, precision, zero, cfg.data.seq_length, t.micro_batch_size, micro_batches,
                     parallel=cfg.parallel)[stage_index]
    width = 4 if precision == "fp32" else 2
    per_block = per_layer_activation_bytes(cfg.model, layout.tp, cfg.data.seq_length, t.micro_batch_size,
                                           recompute, width, width)
    result = {"rank": rank, "stage": stage_index, "weights": weights / 2 ** 30, "est_weights": stage.weights,
              "optimizer": optimizer / 2 ** 30, "est_optimizer": stage.optimizer,
              "gradients": gradients.peak / 2 ** 30, "est_gradients": stage.gradients,
              "block_calls": len(saved.calls), "block": statistics.median(saved.calls), "est_block": per_block,
              "standalone": _standalone_blocks(cfg.model, layout.tp, cfg.data.seq_length, t.micro_batch_size),
              "loss_calls": len(loss.calls), "loss_saved": max(loss.calls, default=0),
              "est_loss_saved": kept_logits_bytes(cfg.model, layout.tp, cfg.data.seq_length, t.micro_batch_size,
                                                  precision)}
    if in_flight:
        expected = estimated_in_flight(layout.pp, stage_index, micro_batches)
        result.update(in_flight=in_flight.peak, est_in_flight=expected,
                      stage_activations=in_flight.peak * stage.layers * result["block"] / 2 ** 30,
                      est_stage_activations=expected * stage.layers * per_block / 2 ** 30)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """measured(case): that case's per-rank measurements, launched once per case (on first use)
    and shared by the tests below."""
    results = {}

    def get(case):
        if case not in results:
            layout, zero, precision, recompute = case
            out = tmp_path_factory.mktemp("memory") / "measured.json"
            run_processes(_measure, layout, layout, zero, precision, recompute, str(out))
            results[case] = [json.loads(open(f"{out}.{r}").read()) for r in range(layout.world_size)]
        return results[case]
    return get


IDS = [f"tp{l.tp}pp{l.pp}dp{l.dp}-zero{z}-{p}-{r}" for l, z, p, r in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_weights_optimizer_and_gradients_match_the_estimate(measured, case):
    for got in measured(case):
        for part in ("weights", "optimizer", "gradients"):
            assert got[part] == pytest.approx(got[f"est_{part}"], rel=TOLERANCE), (part, got)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_block_activations_match_the_estimate(measured, case):
    layout = case[0]
    for got in measured(case):
        assert got["block_calls"] > 0, got
        assert got["block"] == pytest.approx(got["est_block"], rel=TOLERANCE), got
        for name, (counted, estimated) in got["standalone"].items():
            assert counted == pytest.approx(estimated, rel=TOLERANCE), (f"tp{layout.tp}", name, counted, estimated)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logits_kept_for_the_loss_match_the_estimate(measured, case):
    """The last stage's logits, which the loss keeps for its backward: what autograd saved in each
    loss call against the estimate's logits part (its transient fp32 chunk aside)."""
    layout = case[0]
    with_loss = [got for got in measured(case) if got["loss_calls"]]
    assert len(with_loss) == (layout.world_size // layout.pp), measured(case)  # every last-stage rank
    for got in with_loss:
        assert got["loss_saved"] == pytest.approx(got["est_loss_saved"], rel=TOLERANCE), got


def test_pipeline_in_flight_micro_batches_match_the_estimate(measured):
    case = next(c for c in CASES if c[0].pp > 1)
    for got in measured(case):
        assert got["in_flight"] == got["est_in_flight"], got  # 1F1B: pp - stage (here 2, then 1)
        assert got["stage_activations"] == pytest.approx(got["est_stage_activations"], rel=TOLERANCE), got


def test_fused_attention_keeps_no_scores_in_the_plan():
    """The plan of a GPU run counts the s*s attention terms only for the eager kernel: flex and SDPA's
    fused kernels keep none (on an H200, bf16, seq 2048, recompute none and selective peaked at the
    same memory, README). Against the bytes counted here from the shapes (bf16, both dropouts, a
    1-byte mask on GPU): a block keeps Korthikanti's 34sbh outside the attention core, and the eager
    kernel adds its core, a*s*s*b scores x (4 fp32 softmax output + 2 dropout output + 1 mask)."""
    from dataclasses import replace

    from training.config.schema import ModelConfig
    from training.plan.memory_estimate import estimate

    model = ModelConfig(hidden_size=1024, num_layers=4, num_heads=16, vocab_size=8192, hidden_dropout=0.1,
                        attention_dropout=0.1)
    layout, seq, micro = Layout(1, 1, 1), 2048, 2
    L, sbh = model.num_layers, seq * micro * model.hidden_size
    block = 34 * sbh  # 16sbh values x 2 bytes (LayerNorm, QKV and FFN inputs, Q, K, V, context, GeLU in/out) + 2sbh mask
    full = 2 * sbh  # full recomputation keeps the block's input
    core = model.num_heads * seq * seq * micro * (4 + 2 + 1)

    def activations(kernels, recompute):  # bytes; the logits (last stage) cancel in the differences
        cfg = replace(model, kernels=kernels, recompute=recompute)
        return estimate(cfg, layout, "bf16", 1, seq, micro, 1)[0].activations * 2 ** 30

    for fused in ("auto", "flex"):
        # fused: every layer keeps its block and no core, with none as with selective; full keeps
        # the inputs and holds one recomputed block (no core) during its backward
        for recompute in ("none", "selective"):
            assert activations(fused, recompute) - activations(fused, "full") == pytest.approx(
                L * block - (L * full + block)), (fused, recompute)
    # eager: every layer keeps its core with none; selective holds one layer's while recomputing
    # it; full's recomputed block holds its core too
    assert activations("eager", "none") - activations("auto", "none") == pytest.approx(L * core)
    assert activations("eager", "none") - activations("eager", "selective") == pytest.approx((L - 1) * core)
    assert activations("eager", "full") - activations("auto", "full") == pytest.approx(core)
