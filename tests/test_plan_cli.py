"""bloom-plan: ranks only layouts that fit, explains the winner, times the run, prints one JSON
object for a given layout, answers in seconds, and refuses bad input in one line."""
import json
import re
import subprocess
import sys

import pytest

from launch.plan_cli import main as bloom_plan
from training.config.loader import load_config
from training.plan.flops import megatron_flops
from training.plan import performance
from training.plan.hardware import load_gpu
from training.plan.planner import ENGINE, MEMORY_MARGIN, memory_gib, model_shape, plan


def _lines(capsys):
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err.splitlines()


def test_7b1_on_two_a100_40gb_nodes_answers_in_seconds(capsys):
    assert bloom_plan(["model=bloom-7b1", "launcher.nodes=2", "launcher.gpus_per_node=8",
                       "launcher.gpu_type=A100-40GB"]) == 0
    out, err = _lines(capsys)  # how long it took is printed ("answered in"), not asserted: a shared machine
    rows = [line for line in out if re.match(r"^ *\d+  \d+ x \d+ x \d+ ", line)]
    assert len(rows) == 10
    assert any(line.startswith("why: #1 vs #2") for line in out)
    assert any(line.startswith("configured: TP 4 x PP 4") for line in out)  # BigScience's TP/PP
    assert any(line.startswith("run: 220,000,000 samples") and "GPU-hours" in line for line in out)
    assert any(line.startswith("answered in ") for line in out)


def test_only_fitting_layouts_are_ranked_fastest_first():
    cfg = load_config(["experiment=bloom-7b1", "launcher.nodes=2", "launcher.gpus_per_node=8",
                       "launcher.gpu_type=A100-40GB"])
    result = plan(cfg)
    assert result.budget_gib == pytest.approx(40 * (1 - MEMORY_MARGIN))
    speeds = [c.prediction.tokens_per_sec for c in result.ranked]
    assert speeds == sorted(speeds, reverse=True)
    # the estimate recomputed for each ranked layout fits; every refused one does not
    ranked = {c.key() for c in result.ranked}
    assert all(memory_gib(cfg, c.layout) <= result.budget_gib for c in result.ranked)
    from training.plan.planner import layouts

    refused = [lay for lay in layouts(cfg, 16, "fp16")
               if (lay.tp, lay.pp, lay.dp, lay.micro_batch, lay.recompute, lay.sequence_parallel,
                   lay.zero_stage) not in ranked]
    assert refused and all(memory_gib(cfg, lay) > result.budget_gib for lay in refused)


@pytest.mark.parametrize("size", ["bloom-176b", "bloom-560m"])
def test_bigscience_layout_rank_and_winner_gain(size, capsys):
    cfg = load_config([f"experiment={size}"])
    result = plan(cfg)
    c = result.configured
    assert (c.layout.tp, c.layout.pp, c.layout.dp) == (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp)
    assert result.configured_rank is not None  # BigScience's layout fits its own hardware
    assert result.ranked[result.configured_rank - 1].key() == c.key()
    gain = result.ranked[0].prediction.tokens_per_sec / c.prediction.tokens_per_sec - 1
    # Independently of plan(): the configured layout as the config spells it, and the winner's,
    # each predicted on its own; a step holds the same tokens in both, so the gain is the ratio of
    # their step times. The winner gains exactly when the configured layout is not #1.
    p, t, world = cfg.parallel, cfg.trainer, cfg.launcher.nodes * cfg.launcher.gpus_per_node
    mine = performance.Layout(p.tp, p.pp, world // (p.tp * p.pp), t.micro_batch_size, t.global_batch_size,
                              cfg.model.recompute, p.sequence_parallel, p.zero_stage, t.precision)
    assert c.layout == mine

    def step_s(lay):
        return performance.predict(model_shape(cfg, lay.tp), lay, load_gpu(cfg.launcher.gpu_type),
                                   cfg.launcher.gpus_per_node, engine=ENGINE).step_time_s

    assert gain == pytest.approx(step_s(mine) / step_s(result.ranked[0].layout) - 1, rel=1e-9)
    assert (gain > 0) == (result.configured_rank > 1)
    assert bloom_plan([f"experiment={size}", "--top", "3"]) == 0
    out, _ = _lines(capsys)
    line = next(line for line in out if line.startswith("configured:"))
    assert f"rank {result.configured_rank} of {len(result.ranked)}" in line and f"{gain:+.1%}" in line


def test_json_for_the_176b_layout(capsys):
    assert bloom_plan(["experiment=bloom-176b", "--json"]) == 0
    out, _ = _lines(capsys)
    assert len(out) == 1
    got = json.loads(out[0])
    assert (got["tp"], got["pp"], got["dp"], got["micro_batch_size"], got["recompute"]) == (4, 12, 8, 2, "full")
    step = got["step_time_s"]
    B, s, L, h, V = 2048, 2048, 70, 14336, 250880
    assert got["tokens_per_sec"] == pytest.approx(B * s / step)
    assert got["tflops_per_gpu"] == pytest.approx(megatron_flops(h, L, s, V, B, 4 * h, 3) / (step * 384e12))
    assert got["hardware_tflops_per_gpu"] == pytest.approx(megatron_flops(h, L, s, V, B, 4 * h, 4) / (step * 384e12))
    assert got["mfu"] == pytest.approx(got["tflops_per_gpu"] / 312)
    assert 0 < got["memory_per_gpu_gib"] < 80 and got["fits"] is True


def test_bad_input_is_one_line(capsys):
    assert bloom_plan(["launcher.gpu_type=B300"]) == 2
    out, err = _lines(capsys)
    assert err == ["bloom-plan: error: launcher.gpu_type=B300 is not in the hardware catalogue "
                   "(A100-40GB, A100-80GB, H100-80GB, H200-141GB, V100-32GB, cpu) nor a YAML file with its keys"]
    # 31 GPUs: TP must divide 32 heads, PP <= 30 layers, and 31 replicas cannot split a batch of 512
    assert bloom_plan(["model=bloom-7b1", "launcher.nodes=1", "launcher.gpus_per_node=31",
                       "launcher.gpu_type=A100-80GB"]) == 2
    out, err = _lines(capsys)
    assert len(err) == 1 and err[0].startswith("bloom-plan: error: no layout of bloom-7b1 uses world size 31")
    assert bloom_plan(["experiment=bloom-176b", "launcher.nodes=1"]) == 2
    out, err = _lines(capsys)
    assert len(err) == 1 and "fits no layout on 1 x 8 A100-80GB" in err[0]
    nodes = int(err[0].split("(launcher.nodes=")[1].rstrip(")"))
    # the cluster it names does fit, and half of it does not
    assert plan(load_config(["experiment=bloom-176b", f"launcher.nodes={nodes}"])).ranked
    with pytest.raises(Exception, match="fits no layout"):
        plan(load_config(["experiment=bloom-176b", f"launcher.nodes={nodes // 2}"]))


def test_console_script_has_no_traceback():
    run = subprocess.run([sys.executable, "-m", "launch.plan_cli", "experiment=bloom-176b", "launcher.nodes=1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert [line for line in run.stderr.splitlines() if line.strip()][-1].startswith("bloom-plan: error: ")


def test_dry_run_uses_the_same_engine(tmp_path, capsys):
    from launch.train_cli import main as bloom_train

    assert bloom_train(["experiment=bloom-176b", "trainer.dry_run=true", f"trainer.run_dir={tmp_path}"]) == 0
    performance = json.loads((tmp_path / "plan.json").read_text())["performance"]
    result = plan(load_config(["experiment=bloom-176b"]))
    assert performance["rank"] == result.configured_rank
    assert performance["step_time_s"] == pytest.approx(result.configured.prediction.step_time_s)
    assert performance["memory_per_gpu_gib"] <= 80
    out, _ = _lines(capsys)
    assert any(line.startswith("performance  predicted") and f"rank {result.configured_rank} of" in line for line in out)
