"""This framework's training step against a plain Hugging Face loop on the same model, side by side.

    python benchmarks/bench_vs_hf.py [--case hidden512|demo|both] [--rounds 5] [--steps 2]
                                     [--profile] [--device cpu|cuda] [--precision fp32|bf16]

Framework: the engine `bloom-train` runs (training/engine/engine.py's BloomEngine, built from
the project's Hydra config with these overrides: one process, TP = PP = DP = 1, ZeRO as configured,
`model.kernels=auto`), stepped the way training/trainer.py steps it (learning rate, then
`train_step(micro_batches)`).
HF loop: `transformers.BloomForCausalLM` with the framework's initial weights (copied through
training/hf/convert.py), the same micro-batches, `torch.optim.AdamW(foreach=True)` with the same
hyperparameters and weight-decay groups, gradient clipping at the same norm, and dropout as
configured in both (off in these cases). HF's Bloom has no SDPA attention (transformers 5.24
refuses `attn_implementation="sdpa"` for it), so the loop is timed twice: `hf` with HF's own
attention as shipped, and `hf+sdpa` with HF's attention forward swapped for
scaled_dot_product_attention with the ALiBi + causal bias as its mask (what a user wanting a fast
plain loop would write). The first step's losses must agree (asserted) before anything is timed.

Timing: after two warm-up steps each (compilation, allocator), rounds of `--steps` steps of each
runner in turn, the order rotated every round, so load on a shared machine hits every runner
alike. Printed: tokens/s of each (median over rounds) and the framework's ratio to each HF loop
(median of the per-round ratios), on the wall clock and on this process's CPU time (tokens per
CPU-second: steadier than wall time when other programs share the cores). `--profile` then runs torch.profiler over a few steps of the
framework and of `hf+sdpa` and prints the top operators by self CPU time (or CUDA time).

benchmarks/gpu_check.py uses the same pieces (build_framework, HFLoop, interleaved) in bf16 on a GPU.
"""
import argparse
import math
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # as bloom-train does: DeepSpeed's CPU accelerator, quietly

# Hidden 512 as the issue asks; one micro-batch of 4 x 512 per step.
CASES = {
    "hidden512": ["model.hidden_size=512", "model.num_layers=8", "model.num_heads=8",
                  "data.seq_length=512", "trainer.micro_batch_size=4", "trainer.global_batch_size=4"],
    # The demo model and batch as shipped (bloom-tiny, 4 micro-batches of 4 x 128 per step).
    "demo": [],
}


def one_process_job(device: torch.device) -> None:
    """A one-process torch.distributed group and megatron-core's TP/PP/DP state, as bloom-train forms."""
    from parallelism.topology import Layout, init_model_parallel, init_process_group

    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    init_model_parallel(Layout(1, 1, 1))


@dataclass
class Framework:
    cfg: object
    engine: object
    device: torch.device

    def step(self, micro_batches: List[dict]) -> float:
        from training.lr_schedule import learning_rate

        self.engine.set_learning_rate(learning_rate(self.cfg.optim, 0))
        return self.engine.train_step(micro_batches).loss


def build_framework(overrides: List[str], device: torch.device) -> Framework:
    from training.engine.engine import BloomEngine
    from parallelism.topology import Layout
    from training.config.loader import load_config

    # Constant learning rate at the peak, as the HF loop: the warm-up would make the first steps no-ops.
    cfg = load_config(["optim.warmup_samples=0", *overrides])
    engine = BloomEngine(cfg, Layout(1, 1, 1), cfg.trainer.global_batch_size, device)
    return Framework(cfg, engine, device)


def micro_batches(cfg, steps: int, seed: int = 0) -> List[List[dict]]:
    """`steps` global batches of random tokens (the first eighth of the vocabulary), as micro-batches."""
    generator = torch.Generator().manual_seed(seed)
    mbs, gbs, seq = cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size, cfg.data.seq_length
    out = []
    for _ in range(steps):
        samples = torch.randint(0, cfg.model.vocab_size // 8, (gbs, seq + 1), generator=generator)
        out.append([{"tokens": samples[i:i + mbs, :-1], "labels": samples[i:i + mbs, 1:],
                     "loss_mask": torch.ones(mbs, seq)} for i in range(0, gbs, mbs)])
    return out


def model_state(framework: Framework) -> Dict[str, torch.Tensor]:
    """The framework model's weights as fp32 CPU tensors (TP = 1), e.g. to build HF's model later."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in framework.engine.module.state_dict().items()
            if isinstance(v, torch.Tensor)}  # megatron layers add _extra_state entries (None)


def hf_model(state: Dict[str, torch.Tensor], model_cfg, device: torch.device, attention: str = "hf"):
    """BloomForCausalLM (fp32) holding these weights of our model, on `device`, in training mode."""
    from transformers import BloomConfig, BloomForCausalLM

    from training.hf.convert import hf_from_shards
    from training.model.shapes import padded_vocab_size

    m = model_cfg
    rows = padded_vocab_size(m, 1)
    hf_state = hf_from_shards([state], m.num_layers, vocab_size=rows)
    config = BloomConfig(vocab_size=rows, hidden_size=m.hidden_size, n_layer=m.num_layers,
                         n_head=m.num_heads, layer_norm_epsilon=m.layer_norm_epsilon,
                         hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                         use_cache=False, tie_word_embeddings=True)
    with torch.device(device):  # HF's random initialisation, overwritten below, runs on the device
        model = BloomForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights did not map onto BloomForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if attention == "hf+sdpa":
        for block in model.transformer.h:
            block.self_attention.forward = types.MethodType(_sdpa_attention_forward, block.self_attention)
    return model.to(device).train()


def hf_model_from(framework: Framework, attention: str = "hf"):
    """BloomForCausalLM holding the framework's current weights, on its device."""
    return hf_model(model_state(framework), framework.cfg.model, framework.device, attention)


def _sdpa_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                            use_cache=False, output_attentions=False, **kwargs):
    """HF BloomAttention.forward (transformers 5.x) with its baddbmm + softmax + bmm replaced by
    scaled_dot_product_attention; the ALiBi bias plus HF's additive causal mask is the SDPA mask."""
    from transformers.models.bloom.modeling_bloom import dropout_add

    batch, q_len, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [b, heads, s, head_dim]
    bias = alibi.view(batch, self.num_heads, 1, -1)  # slope * key position, [b, heads, 1, s]
    if attention_mask is None:
        future = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).triu(1)
        attention_mask = torch.zeros(q_len, q_len, dtype=bias.dtype, device=query.device).masked_fill(
            future, torch.finfo(bias.dtype).min)
    bias = (bias + attention_mask).to(query.dtype)
    dropout = self.attention_dropout.p if self.training else 0.0
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                             scale=self.inv_norm_factor)
    context = context.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
    output = dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None


class HFLoop:
    """The plain loop: forward, cross entropy, backward (accumulating over micro-batches), clip, AdamW."""

    def __init__(self, model, optim_cfg, autocast_dtype=None):
        from training.optimizer import parameter_groups

        self.model, self.clip = model, optim_cfg.clip_grad
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype  # bf16: fp32 weights, bf16 compute (HF Trainer's bf16=True)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                                           betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                                           foreach=True)

    def step(self, micro_batches: List[dict]) -> float:
        total = 0.0
        for batch in micro_batches:
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                logits = self.model(input_ids=tokens).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            (loss / len(micro_batches)).backward()
            total += loss.detach()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total) / len(micro_batches)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(runners: Dict[str, Callable[[List[dict]], float]], batches: List[List[dict]],
                rounds: int, steps: int, device: torch.device) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per step of each runner, one value per round, as wall time ("wall") and as this
    process's CPU time ("cpu": all its threads; less sensitive than wall time to other programs
    taking the cores of a shared machine). The runners take turns, their order rotated each round."""
    names = list(runners)
    seconds = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(steps):
                runners[name](batches[(r * steps + i) % len(batches)])
            synchronize(device)
            seconds[name]["wall"].append((time.perf_counter() - wall) / steps)
            seconds[name]["cpu"].append((time.process_time() - cpu) / steps)
    return seconds


def first_step_losses(runners: Dict[str, Callable], batch: List[dict]) -> Dict[str, float]:
    """Each runner's loss on the same first batch, from the same weights."""
    return {name: run(batch) for name, run in runners.items()}


def check_equal_losses(losses: Dict[str, float], rtol: float) -> None:
    reference = losses["framework"]
    for name, loss in losses.items():
        if not math.isclose(loss, reference, rel_tol=rtol):
            raise AssertionError(f"first-step loss of {name} is {loss:.6f}, the framework's {reference:.6f} "
                                 f"(rtol {rtol}): the two do not compute the same function")


def ratio_table(seconds: Dict[str, Dict[str, List[float]]], tokens_per_step: int, clock: str = "wall") -> List[tuple]:
    """(name, median tokens/s, median of the per-round ratios framework speed / name's speed) for
    each runner, on one clock ("wall" or "cpu")."""
    rows = []
    framework = seconds["framework"][clock]
    for name, clocks in seconds.items():
        values = clocks[clock]
        ratios = [theirs / ours for ours, theirs in zip(framework, values)]  # > 1: the framework is faster
        rows.append((name, tokens_per_step / statistics.median(values), statistics.median(ratios)))
    return rows


def profile(runner: Callable, batches: List[List[dict]], device: torch.device, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for batch in batches[:1]:
        runner(batch)
    with torch_profile(activities=activities) as prof:
        for batch in batches[:3]:
            runner(batch)
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)


def run_case(name: str, args, device: torch.device) -> List[tuple]:
    framework = build_framework(CASES[name] + list(args.override), device)
    cfg = framework.cfg
    batches = micro_batches(cfg, max(4, args.steps * 2))
    runners = {"framework": framework.step}
    for attention in args.hf:
        runners[attention] = HFLoop(hf_model_from(framework, attention), cfg.optim).step
    losses = first_step_losses(runners, batches[0])
    check_equal_losses(losses, rtol=1e-5)
    for _ in range(1):  # second warm-up step each (the first compiled)
        first_step_losses(runners, batches[1])
    tokens = cfg.trainer.global_batch_size * cfg.data.seq_length
    m = cfg.model
    print(f"\n{name}: hidden {m.hidden_size}, {m.num_layers} layers, {m.num_heads} heads, vocab "
          f"{cfg.model.padded_vocab_size or cfg.model.vocab_size}, seq {cfg.data.seq_length}, global batch "
          f"{cfg.trainer.global_batch_size} (micro {cfg.trainer.micro_batch_size}), {cfg.trainer.precision}, "
          f"ZeRO {cfg.parallel.zero_stage}, kernels {m.kernels}; first-step loss "
          + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    seconds = interleaved(runners, batches, args.rounds, args.steps, device)
    rows = ratio_table(seconds, tokens, "wall")
    cpu_rows = ratio_table(seconds, tokens, "cpu")
    for (runner, tokens_per_s, ratio), (_, per_cpu_s, cpu_ratio) in zip(rows, cpu_rows):
        per_round = " ".join(f"{tokens / s:.0f}" for s in seconds[runner]["wall"])
        print(f"  {runner:10s} {tokens_per_s:8.0f} tokens/s (wall)  {ratio:5.2f}x   "
              f"{per_cpu_s:8.0f} tokens/CPU-s  {cpu_ratio:5.2f}x   wall rounds: {per_round}")
    if args.profile:
        for runner in ("framework", args.hf[-1]):
            print(f"\n  profile of {runner} ({name}), 3 steps:")
            print(profile(runners[runner], batches, device, args.top))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=[*CASES, "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per runner per round")
    parser.add_argument("--hf", nargs="+", default=["hf", "hf+sdpa"], choices=["hf", "hf+sdpa"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides for the framework")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    one_process_job(device)
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"{args.rounds} interleaved rounds of {args.steps} steps each; medians; ratio = framework "
          f"speed / runner speed (above 1: the framework is faster)")
    for name in (list(CASES) if args.case == "both" else [args.case]):
        run_case(name, args, device)


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    main()
