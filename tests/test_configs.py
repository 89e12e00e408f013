"""Configs: every BLOOM size builds the model HF builds (parameter count on the meta device, against
HF BloomForCausalLM and the counts BigScience published), every invalid config is refused with one
line naming the value, and the run plans lay out the BigScience runs within their GPUs' memory."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from launch.slurm import checked_config as bloom_slurm_config
from launch.train_cli import main as bloom_train
from parallelism.precision_support import FORCE_ENV, unsupported_reason
from training.config.checks import validate, world_size
from training.config.loader import ConfigError, load_config
from training.plan.run_plan import count_parameters_as_built, count_parameters_from_table, make_plan

# BLOOM_FACTS.md: HF BloomForCausalLM parameter counts of the released models (vocab 250880).
PUBLISHED = {
    "bloom-560m": 559_214_592, "bloom-1b1": 1_065_314_304, "bloom-1b7": 1_722_408_960,
    "bloom-3b": 3_002_557_440, "bloom-7b1": 7_069_016_064, "bloom-176b": 176_247_271_424,
}
GPU_MEMORY = {"bloom-176b": 80}  # A100-80GB (data sheet); the smaller runs used V100-32GB
SIZES = sorted(PUBLISHED)


def hf_parameter_count(cfg) -> int:
    config = BloomConfig(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size,
                         n_layer=cfg.num_layers, n_head=cfg.num_heads)
    with torch.device("meta"):
        model = BloomForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_matches_hf(single_process, size):
    cfg = load_config([f"experiment={size}"])
    built = count_parameters_as_built(cfg.model, cfg.parallel.tp)
    assert built == hf_parameter_count(cfg.model) == PUBLISHED[size]
    assert count_parameters_from_table(cfg.model, cfg.parallel.tp) == built


@pytest.mark.parametrize("size", SIZES)
def test_bigscience_layout_fits(single_process, size):
    cfg = load_config([f"experiment={size}"])
    # Validated for the cluster the plan is for, not for this machine (whose process group the
    # parameter count needs).
    plan = make_plan(cfg, validate(cfg, world_size(cfg, env={}), trains_here=False))
    assert plan["world_size"] == cfg.launcher.nodes * cfg.launcher.gpus_per_node
    assert plan["memory_per_gpu_gib"]["gpu_memory_gib"] == GPU_MEMORY.get(size, 32)
    assert plan["memory_per_gpu_gib"]["fits"] is True
    assert sum(plan["layers_per_stage"]) == cfg.model.num_layers
    # Every GPU of a stage holds its share: summed over stages and TP ranks (replicated tensors
    # counted once per rank), the shares cover the whole model at least once.
    assert sum(s["parameters"] for s in plan["stages"]) * plan["tp"] >= plan["parameters"]


def test_176b_plan_is_bigscience_layout(tmp_path, capsys):
    code = bloom_train(["experiment=bloom-176b", "trainer.dry_run=true", f"trainer.run_dir={tmp_path}"])
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert (plan["tp"], plan["pp"], plan["dp"], plan["world_size"]) == (4, 12, 8, 384)
    assert plan["parameters"] == PUBLISHED["bloom-176b"]
    assert (plan["micro_batch_size"], plan["global_batch_size"]) == (2, 2048)
    assert plan["layers_per_stage"] == [5] + [6] * 10 + [5]  # BigScience's split
    memory = plan["memory_per_gpu_gib"]
    assert memory["fits"] and 0 < memory["total"] < 80
    for part in ("weights", "gradients", "optimizer", "activations"):
        assert memory[part] > 0
    assert "TP 4 x PP 12 x DP 8" in capsys.readouterr().out


def test_dp_derived_from_world_size():
    cfg = load_config(["parallel.tp=2", "launcher.nproc_per_node=8"])
    assert validate(cfg).dp == 4
    cfg = load_config(["parallel.tp=2", "parallel.pp=2"])
    assert validate(cfg, 8).dp == 2
    assert world_size(cfg, env={"WORLD_SIZE": "16"}) == 16  # under torchrun/srun


INVALID = {
    "heads not divisible by TP": (["parallel.tp=3", "launcher.nproc_per_node=3"], "model.num_heads=4"),
    "layers over PP": (["parallel.pp=8", "launcher.nproc_per_node=8"], "model.num_layers=4"),
    "world size not TP x PP x DP": (["parallel.tp=2", "launcher.nproc_per_node=3"], "world size 3"),
    "dp disagrees": (["parallel.dp=2"], "parallel.dp=2"),
    "global batch vs micro x DP": (["trainer.global_batch_size=18"], "trainer.global_batch_size=18"),
    "rampup not reachable": (["trainer.rampup_batch_size=[8,3,100]"], "trainer.rampup_batch_size"),
    "vocab padding smaller than vocab": (["model.padded_vocab_size=4000"], "model.padded_vocab_size=4000"),
    "vocab padding not divisible by TP": (["model.padded_vocab_size=8001", "model.vocab_size=8000",
                                           "parallel.tp=2", "launcher.nproc_per_node=2"],
                                          "model.padded_vocab_size=8001"),
    "ZeRO 2 with PP": (["parallel.zero_stage=2", "parallel.pp=2", "launcher.nproc_per_node=2"],
                       "parallel.zero_stage=2"),
    "16-bit without ZeRO": (["trainer.precision=bf16", "parallel.zero_stage=0"], "parallel.zero_stage >= 1"),
    "unknown key": (["model.hiden_size=64"], "model.hiden_size"),
    "unknown group option": (["model=bloom-99b"], "model/bloom-99b"),
    "wrong type": (["trainer.micro_batch_size=big"], "trainer.micro_batch_size"),
    "unknown kernel backend": (["model.kernels=fast"], "model.kernels=fast"),
    "unknown precision": (["trainer.precision=fp8"], "trainer.precision=fp8"),
    "fp16 hysteresis": (["trainer.hysteresis=0"], "trainer.hysteresis=0"),
    "fp16 loss scale window": (["trainer.loss_scale_window=0"], "trainer.loss_scale_window=0"),
    "176b on 47 nodes": (["experiment=bloom-176b", "launcher.nodes=47"], "world size 376"),
    "176b dp vs nodes": (["experiment=bloom-176b", "launcher.nodes=96"], "parallel.dp=8"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_gives_one_line(case, capsys, tmp_path):
    overrides, named = INVALID[case]
    code = bloom_train(overrides + ["trainer.dry_run=true", f"trainer.run_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("bloom-train: error:"), err
    assert named in err
    assert not (tmp_path / "plan.json").exists()


def test_console_script_error_has_no_traceback():
    """The installed entry point, in its own process: exit status 2, one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "launch.train_cli", "parallel.tp=3",
                           "launcher.nproc_per_node=3", "trainer.dry_run=true"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "bloom-train: error: model.num_heads=4 is not divisible by parallel.tp=3: each rank needs whole heads"]


def test_precision_support_is_this_device_fact():
    """Unforced, the answer is the device's own: on CPU oneDNN's fp16 kernels (torch's own
    probe, not DeepSpeed's wrapper around it), on CUDA compute capability 7 for fp16."""
    if torch.cuda.is_available():
        fp16 = torch.cuda.get_device_capability()[0] >= 7
        bf16 = torch.cuda.is_bf16_supported()
    else:
        fp16, bf16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()), True
    assert (unsupported_reason("fp16") is None) == fp16
    assert (unsupported_reason("bf16") is None) == bf16
    assert unsupported_reason("fp32") is None


def test_precision_support_forced_both_ways(monkeypatch):
    cfg = load_config(["trainer.precision=fp16"])
    monkeypatch.setenv(FORCE_ENV, "fp16=no")
    with pytest.raises(ConfigError) as refused:
        validate(cfg, trains_here=True)
    assert str(refused.value) == (f"trainer.precision=fp16 is not supported on this device (forced by {FORCE_ENV}); "
                                  "use bf16 or fp32")
    monkeypatch.setenv(FORCE_ENV, "fp16=yes,bf16=no")
    assert validate(cfg, trains_here=True).dp == 1
    with pytest.raises(ConfigError, match=r"^trainer.precision=bf16 is not supported .* use fp16 or fp32$"):
        validate(load_config(["trainer.precision=bf16"]), trains_here=True)


def test_cluster_validation_ignores_this_device(monkeypatch, tmp_path):
    """bloom-slurm and dry runs validate for the cluster's GPUs: fp16 unsupported here is no reason
    to refuse BigScience's fp16 runs."""
    monkeypatch.setenv(FORCE_ENV, "fp16=no")
    cfg = bloom_slurm_config(["experiment=bloom-1b7"])
    assert cfg.trainer.precision == "fp16"
    assert validate(cfg, 64).dp == 16
    assert bloom_train(["experiment=bloom-1b7", "trainer.dry_run=true", f"trainer.run_dir={tmp_path}"]) == 0


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "torchrun-relaunch"])
def test_bloom_train_refuses_unsupported_precision_in_one_line(tmp_path, processes):
    """The real command, not a dry run: refused before any model or DeepSpeed engine is built, and
    with several local processes before torchrun starts them (not one traceback per rank)."""
    env = dict(os.environ, **{FORCE_ENV: "fp16=no"})
    proc = subprocess.run([sys.executable, "-m", "launch.train_cli", "trainer.precision=fp16",
                           f"launcher.nproc_per_node={processes}", f"trainer.run_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    assert proc.stdout.strip() == ""  # nothing above the error either (DeepSpeed's logger uses stdout)
    assert proc.stderr.strip().splitlines() == [
        f"bloom-train: error: trainer.precision=fp16 is not supported on this device (forced by {FORCE_ENV}); "
        "use bf16 or fp32"]
    assert not any(tmp_path.iterdir()), "a refused run wrote to its run directory"
