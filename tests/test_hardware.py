"""The hardware catalogue: every entry loads with the data-sheet facts the planner relies on, the
plan reads GPU memory from it (launcher.gpu_memory_gib is gone), and a bad gpu_type is one line."""
import subprocess
import sys

import pytest

from training.config.loader import ConfigError, load_config
from training.plan.hardware import catalogue_names, load_gpu

# Dense tensor-core peaks and memory from NVIDIA's data sheets (cited in configs/hardware/*.yaml).
DATA_SHEET = {
    "V100-32GB": (125.0, 32, 900), "A100-40GB": (312.0, 40, 1555), "A100-80GB": (312.0, 80, 2039),
    "H100-80GB": (989.4, 80, 3350), "H200-141GB": (989.4, 141, 4800),
}


def test_catalogue_has_every_entry():
    assert set(catalogue_names()) == set(DATA_SHEET) | {"cpu"}


@pytest.mark.parametrize("name", sorted(DATA_SHEET))
def test_entry_matches_data_sheet(name):
    gpu = load_gpu(name)
    peak, memory_gb, hbm = DATA_SHEET[name]
    assert gpu.name == name and gpu.peak("fp16") == peak
    assert gpu.peak("bf16") == (None if name == "V100-32GB" else peak)  # Volta has no bf16
    assert memory_gb * 0.98 <= gpu.memory_gib <= memory_gb  # GiB as the driver reports it
    assert gpu.hbm_gbs == hbm and gpu.nvlink_gbs >= 300 and gpu.network_gbs > 0


def test_custom_gpu_is_a_yaml_file(tmp_path):
    path = tmp_path / "mygpu.yaml"
    path.write_text("name: mygpu\npeak_tflops: {bf16: 100}\nmemory_gib: 24\nhbm_gbs: 1000\n"
                    "nvlink_gbs: 100\nnetwork_gbs: 10\ngpus_per_node: 4\n")
    assert load_gpu(str(path)).memory_gib == 24
    path.write_text("name: mygpu\npeak_tflops: {bf16: 100}\n")
    with pytest.raises(ConfigError, match="lacks memory_gib"):
        load_gpu(str(path))


def test_custom_gpu_latency_is_optional_and_not_negative(tmp_path):
    path = tmp_path / "mygpu.yaml"
    keys = ("name: mygpu\npeak_tflops: {bf16: 100}\nmemory_gib: 24\nhbm_gbs: 1000\n"
            "nvlink_gbs: 100\nnetwork_gbs: 10\ngpus_per_node: 4\n")
    path.write_text(keys)
    assert load_gpu(str(path)).latency_s == 0
    path.write_text(keys + "latency_us: 30\n")
    assert load_gpu(str(path)).latency_s == pytest.approx(30e-6)
    path.write_text(keys + "latency_us: -1\n")
    with pytest.raises(ConfigError, match="latency_us=-1.0 must not be negative"):
        load_gpu(str(path))


def test_unknown_gpu_is_one_line():
    with pytest.raises(ConfigError, match="launcher.gpu_type=B300 is not in the hardware catalogue"):
        load_gpu("B300")


def test_gpu_memory_gib_key_is_gone():
    with pytest.raises(ConfigError, match="gpu_memory_gib"):
        load_config(["launcher.gpu_memory_gib=80"])


def test_dry_run_unknown_gpu_type_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "launch.train_cli", "trainer.dry_run=true",
                          "launcher.gpu_type=B300", f"trainer.run_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("bloom-train: error: launcher.gpu_type=B300"), run.stderr
    assert "Traceback" not in run.stderr
