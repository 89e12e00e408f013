"""benchmarks/gpu_check.sh in its CPU mode: the one-line notice, then the table with sane numbers.

The GPU mode needs a CUDA machine (and the wheels/ folder); here the script must say that there is
no GPU and still run every part of the table on a tiny model: the framework's variants and the HF
loop from the same weights (equal first-step loss), tokens/s, TFLOPs, MFU against the measured
matmul rate, and the plan's memory estimate.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(?P<model>\S+)\s+(?P<runner>eager / \w+|HF loop \(SDPA\))\s+(?P<tokens>[\d.]+)\s+"
                 r"(?P<tflops>[\d.e+-]+)\s+(?P<mfu_peak>\S+)\s+(?P<mfu_mm>[\d.]+)%\s+(?:(?P<vs_hf>[\d.]+)x\s+)?"
                 r"(?P<mem>\S+)\s+(?P<plan>\S+)\s+(?P<loss>[\d.]+)$")


def flops_per_step() -> float:
    from training.config.schema import ModelConfig
    from training.plan.flops import model_flops_per_iteration

    tiny = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, vocab_size=8000, padded_vocab_size=8192)
    return model_flops_per_iteration(tiny, 8192, 2, 64, False)


FLOPS_PER_STEP = flops_per_step()


def test_gpu_check_cpu_mode_prints_the_table():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--steps", "2"],
                            capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert out.splitlines()[0].startswith("gpu_check: no CUDA GPU here: running the reduced CPU version"), out
    assert "tokens/s" in out and "TFLOPs/GPU" in out and "plan GiB" in out, out

    rows = [m.groupdict() for m in map(ROW.match, out.splitlines()) if m]
    runners = [r["runner"] for r in rows]
    assert runners == ["eager / none", "eager / selective", "HF loop (SDPA)"], out
    for r in rows:
        tokens, tflops, mfu = float(r["tokens"]), float(r["tflops"]), float(r["mfu_mm"]) / 100
        assert tokens > 0 and tflops > 0, r
        # 2 samples x 64 tokens per step: TFLOPs = tokens/s x Megatron's FLOPs per step / 128.
        assert math.isclose(tflops, tokens * FLOPS_PER_STEP / 128 / 1e12, rel_tol=0.02), r
        assert 0 < mfu < 1.0, f"model FLOPs above the measured matmul rate: {r}"
        assert r["mfu_peak"] == "n/a" and r["mem"] == "n/a", r  # no catalogue peak, no allocator reading
        # Every runner starts from the same weights on the same batch; random weights at vocabulary
        # 8192 give about ln(8192) = 9.01.
        assert float(r["loss"]) == float(rows[0]["loss"]), out
        assert abs(float(r["loss"]) - math.log(8192)) < 0.5, r
    framework = [r for r in rows if r["runner"] != "HF loop (SDPA)"]
    for r in framework:
        assert float(r["plan"]) > 0 and float(r["vs_hf"]) > 0, r
        ratio = float(r["tokens"]) / float(rows[-1]["tokens"])
        assert abs(float(r["vs_hf"]) - ratio) <= 0.006 + 0.02 * ratio, r  # printed to 2 decimals
    assert re.search(r"gpu_check: done in \d+ s", out), out
