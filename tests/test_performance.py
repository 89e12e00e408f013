"""The performance model (training/plan/performance.py) against published throughput, and its
mechanisms one at a time. References are the published numbers (training/plan/data/
published_runs.yaml: Narayanan et al. 2021 Table 1 with its run scripts, BLOOM-176B's 149.8
TFLOP/s), never the model's own output."""
import dataclasses
import statistics

import pytest

from training.plan.flops import megatron_flops
from training.plan.hardware import load_gpu
from training.plan.performance import Layout, Shape, predict
from training.plan.published import published_runs

ROWS = published_runs()


def _error(row, shape, layout, gpu):
    prediction = predict(shape, layout, gpu, engine=row.get("engine", "megatron"))
    return prediction.hardware_tflops_per_gpu / row["tflops"] - 1


def test_published_rows_within_15_percent_median_7():
    errors = {row["name"]: _error(row, shape, layout, gpu) for row, shape, layout, gpu in ROWS}
    report = ", ".join(f"{name} {e:+.1%}" for name, e in errors.items())
    assert len(errors) == 11  # the ten rows of Table 1 and BLOOM-176B
    assert all(abs(e) <= 0.15 for e in errors.values()), report
    assert statistics.median(abs(e) for e in errors.values()) <= 0.07, report


def test_published_shapes_are_the_papers():
    # Table 1's parameter counts (billions, one decimal), which its Eq. 2 gives from the shapes
    # (GPT's learned position embeddings, s x h, add < 0.01B): the rows are read as published.
    published = {"gpt-1.7b": 1.7, "gpt-3.6b": 3.6, "gpt-7.5b": 7.5, "gpt-18.4b": 18.4, "gpt-39.1b": 39.1,
                 "gpt-76.1b": 76.1, "gpt-145.6b": 145.6, "gpt-310.1b": 310.1, "gpt-529.6b": 529.6,
                 "gpt-1008b": 1008.0, "bloom-176b": 176.2}
    for row, shape, layout, _ in ROWS:
        positions = shape.seq * shape.hidden if row["source"] == "narayanan2021" else 0
        assert (shape.parameters() + positions) / 1e9 == pytest.approx(published[row["name"]], abs=0.051), row["name"]
        assert layout.world == row["gpus"]


A100 = load_gpu("A100-80GB")
GPT = Shape(hidden=8192, layers=48, heads=64, vocab=51200, seq=2048)


def _run(**changes):
    base = Layout(tp=8, pp=2, dp=32, micro_batch=4, global_batch=1536, recompute="full", zero_stage=0,
                  precision="fp16")
    return predict(GPT, dataclasses.replace(base, **changes), A100)


def test_hardware_flops_are_megatrons_formula():
    p = _run()
    B, s, l, h, V = 1536, 2048, 48, 8192, 51200
    formula = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert megatron_flops(h, l, s, V, B, 4 * h, passes=4) == pytest.approx(formula)
    assert p.hardware_tflops_per_gpu * p.step_time_s * 512 * 1e12 == pytest.approx(formula)
    assert p.tflops_per_gpu == pytest.approx(p.hardware_tflops_per_gpu * 3 / 4)  # MFU counts 3 passes


def test_bubble_is_narayanans():
    m = 1536 // (4 * 32)
    assert _run().bubble == pytest.approx(1 / (m + 1))  # (p-1)/m of the ideal = (p-1)/(m+p-1) of the step
    assert _run(chunks=2).bubble == pytest.approx(0.5 / (m + 0.5))
    assert _run(pp=4, dp=16).bubble == pytest.approx(3 / (1536 // 64 + 3))


def test_recompute_costs_in_order_and_full_costs_a_forward():
    none, selective, full = (_run(recompute=r) for r in ("none", "selective", "full"))
    assert none.step_time_s < selective.step_time_s < full.step_time_s
    # full recompute adds one forward to forward + backward: about 4/3 of the compute
    ratio = full.parts_s["compute_per_microbatch"] / none.parts_s["compute_per_microbatch"]
    assert 1.25 < ratio < 1.36


def test_tp_across_nodes_uses_the_network():
    inside = predict(GPT, Layout(8, 1, 8, 1, 64, zero_stage=1, precision="bf16"), A100)
    across = predict(GPT, Layout(16, 1, 4, 1, 64, zero_stage=1, precision="bf16"), A100)
    # 16 > 8 GPUs per node: every block's collectives cross the 25 GB/s network instead of NVLink
    assert across.parts_s["tp_comm_per_microbatch"] > 5 * inside.parts_s["tp_comm_per_microbatch"]


def test_tp_split_lowers_matmul_efficiency():
    small = Shape(hidden=1024, layers=24, heads=16, vocab=51200, seq=2048)
    tp1 = predict(small, Layout(1, 1, 8, 4, 256, zero_stage=1, precision="bf16"), A100)
    tp8 = predict(small, Layout(8, 1, 1, 4, 256, zero_stage=1, precision="bf16"), A100)
    # 8 x the GPUs per replica, less than 8 x faster per micro-batch: smaller matmuls
    assert tp8.parts_s["compute_per_microbatch"] * 8 > tp1.parts_s["compute_per_microbatch"] * 1.1


def test_sequence_parallel_moves_the_same_bytes_and_saves_elementwise_work():
    off, on = _run(), _run(sequence_parallel=True)
    assert on.parts_s["tp_comm_per_microbatch"] == pytest.approx(off.parts_s["tp_comm_per_microbatch"])
    assert on.parts_s["compute_per_microbatch"] < off.parts_s["compute_per_microbatch"]


def test_faster_gpu_is_faster_and_v100_has_no_bf16():
    h100 = predict(GPT, Layout(8, 2, 32, 4, 1536, precision="bf16"), load_gpu("H100-80GB"))
    a100 = predict(GPT, Layout(8, 2, 32, 4, 1536, precision="bf16"), A100)
    assert h100.step_time_s < a100.step_time_s
    with pytest.raises(ValueError, match="no bf16 peak"):
        predict(GPT, Layout(8, 2, 32, 4, 1536, precision="bf16"), load_gpu("V100-32GB"))


def test_unequal_stages_one_micro_batch_costs_their_sum_not_p_times_the_slowest():
    # BLOOM-shaped: a 250880-row vocabulary makes the last stage (logits + loss) much the slowest.
    bloom = Shape(hidden=1024, layers=8, heads=16, vocab=250880, seq=2048)
    lay = Layout(1, 2, 1, 1, 1, recompute="none", zero_stage=0, precision="bf16")
    one, two_stages = predict(bloom, lay, A100), predict(bloom, dataclasses.replace(lay, pp=1), A100)
    # One micro-batch crosses stage 0, then stage 1, forward and backward: no more than the
    # unsplit model's compute (plus the two sends), while 2 x the slowest stage would be far more.
    slowest = one.parts_s["compute_per_microbatch"]
    assert one.parts_s["pipeline_s"] == pytest.approx(two_stages.parts_s["pipeline_s"] + 2 * one.parts_s["p2p_per_microbatch"], rel=1e-6)
    assert one.parts_s["pipeline_s"] < 1.8 * slowest
    # Many micro-batches: the slowest stage paces them, the other fills and drains once.
    many = predict(bloom, dataclasses.replace(lay, global_batch=16), A100)
    per_micro = slowest + many.parts_s["p2p_per_microbatch"] + many.parts_s["grad_accumulation_per_microbatch"]
    first_stage = one.parts_s["pipeline_s"] - slowest - 2 * one.parts_s["p2p_per_microbatch"]
    fill_and_drain = first_stage + many.parts_s["p2p_per_microbatch"] + many.parts_s["grad_accumulation_per_microbatch"]
    assert many.parts_s["pipeline_s"] == pytest.approx(16 * per_micro + fill_and_drain, rel=1e-9)
    assert fill_and_drain < 0.5 * per_micro  # where (m + p - 1) x the slowest would add a whole one


def test_deepspeed_zero_all_reduces_gradients_megatron_reduce_scatters():
    # DeepSpeed's ZeRO 1-2 all-reduce the whole gradient and all-gather the parameters; Megatron's
    # distributed optimizer reduce-scatters: for fp32 weights and gradients (one width), the
    # bytes on the wire are 3 (n-1)/n P w against 2 (n-1)/n P w.
    lay = Layout(1, 1, 8, 1, 64, recompute="none", zero_stage=1, precision="fp32")
    small = Shape(hidden=1024, layers=24, heads=16, vocab=51200, seq=2048)
    gpu = load_gpu("A100-80GB")
    ds = predict(small, lay, gpu, engine="deepspeed").parts_s["dp_total_s"]
    mg = predict(small, lay, gpu, engine="megatron").parts_s["dp_total_s"]
    assert ds / mg == pytest.approx(1.5, rel=1e-9)
    # DeepSpeed's bucket copies cost memory passes that Megatron's model leaves out
    assert predict(small, lay, gpu, engine="deepspeed").parts_s["zero_copies_s"] > 0
    assert predict(small, lay, gpu, engine="megatron").parts_s["zero_copies_s"] == 0


def test_collective_latency_is_paid_per_message():
    # gloo-like start-up (0.3 ms) on tiny messages: TP's 4 collectives per layer each pay it once.
    small = Shape(hidden=64, layers=2, heads=4, vocab=512, seq=16)
    lay = Layout(2, 1, 1, 1, 4, recompute="none", zero_stage=0, precision="bf16")
    base = predict(small, lay, A100).parts_s["tp_comm_per_microbatch"]
    slow = predict(small, lay, dataclasses.replace(A100, latency_us=300.0)).parts_s["tp_comm_per_microbatch"]
    assert slow - base == pytest.approx(2 * 4 * 300e-6)
    assert load_gpu("A100-80GB").latency_us == 0  # absent from GPU entries: NCCL's microseconds
    assert load_gpu("cpu").latency_us > 0


def test_weight_gradient_gemm_sums_over_the_micro_batch_tokens():
    # The backward's weight-gradient GEMM reduces over the s x b tokens: a short micro-batch makes
    # it slower per FLOP than the forward (eta of its shape), a long one does not.
    from training.plan.performance import linear_times, gemm_time

    peak = A100.peak("bf16")
    for tokens, slower in ((256, True), (8192, False)):
        forward, backward = linear_times(tokens, 4096, 4096, A100, peak, 2)
        input_grad = gemm_time(tokens, 4096, 4096, A100, peak, 2)
        assert backward - input_grad == pytest.approx(gemm_time(4096, 4096, tokens, A100, peak, 2))
        assert (backward > 2.05 * forward) is slower
