"""The hardware catalogue: each accelerator's facts, read from configs/hardware/<name>.yaml.

`launcher.gpu_type` names an entry (V100-32GB, A100-40GB, A100-80GB, H100-80GB, H200-141GB, cpu)
or is the path of a YAML file with the same keys (a custom GPU). The files cite their data
sheets; configs/hardware/README.md says what each key means. This module is their only reader.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import yaml

import configs
from training.config.schema import ConfigError

CATALOGUE_DIR = Path(configs.__file__).parent / "hardware"
KEYS = ("name", "peak_tflops", "memory_gib", "hbm_gbs", "nvlink_gbs", "network_gbs", "gpus_per_node")
# elementwise_gbs: the rate of the model's elementwise kernels (LayerNorm, GeLU, softmax, ...) in the
# bytes performance.py counts for them, where they do not stream at the memory's rate (a CPU core
# computing tanh and exp); absent on GPUs, whose elementwise kernels are memory-bound.
# solo_speedup: how much faster one process computes while the node's other processes wait than
# while they compute too (shared cores: SMT, power budget, other jobs; performance.py section 7);
# absent: 1.
# latency_us: the fixed start-up time of one collective or point-to-point message, microseconds
# (time = latency + bytes / bandwidth); absent: 0, as for NCCL on the catalogue's GPUs, whose few
# microseconds vanish against the megabytes per message of the layouts planned here.
OPTIONAL_KEYS = ("elementwise_gbs", "solo_speedup", "latency_us")


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: Dict[str, Optional[float]]  # dense tensor-core peak per precision
    memory_gib: float
    hbm_gbs: float
    nvlink_gbs: float  # data sheet's figure: both directions together
    network_gbs: float  # per GPU, one direction
    gpus_per_node: int
    elementwise_gbs: Optional[float] = None  # None: memory-bound (hbm_gbs x performance.ETA_HBM)
    solo_speedup: float = 1.0
    latency_us: float = 0.0

    def peak(self, precision: str) -> Optional[float]:
        """Dense peak TFLOP/s at a training precision; None if the part has no unit for it."""
        return self.peak_tflops.get(precision)

    @property
    def latency_s(self) -> float:
        return self.latency_us / 1e6

    @property
    def nvlink_one_way_gbs(self) -> float:
        return self.nvlink_gbs / 2


def catalogue_names() -> List[str]:
    return sorted(p.stem for p in CATALOGUE_DIR.glob("*.yaml"))


def load_gpu(gpu_type: str) -> GPU:
    """The entry `gpu_type` names, or the YAML file it points to; one ConfigError otherwise."""
    path = CATALOGUE_DIR / f"{gpu_type}.yaml"
    if not path.is_file():
        candidate = Path(gpu_type).expanduser()
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            path = candidate
        else:
            raise ConfigError(f"launcher.gpu_type={gpu_type} is not in the hardware catalogue "
                              f"({', '.join(catalogue_names())}) nor a YAML file with its keys")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"launcher.gpu_type={gpu_type}: {path} is not valid YAML ({error})") from None
    missing = [k for k in KEYS if k not in raw]
    unknown = [k for k in raw if k not in KEYS + OPTIONAL_KEYS]
    if missing or unknown:
        raise ConfigError(f"launcher.gpu_type={gpu_type}: {path} "
                          + (f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(unknown)}"))
    peaks = {str(k): (None if v is None else float(v)) for k, v in dict(raw["peak_tflops"]).items()}
    gpu = GPU(str(raw["name"]), peaks, float(raw["memory_gib"]), float(raw["hbm_gbs"]),
              float(raw["nvlink_gbs"]), float(raw["network_gbs"]), int(raw["gpus_per_node"]),
              None if raw.get("elementwise_gbs") is None else float(raw["elementwise_gbs"]),
              float(raw.get("solo_speedup", 1.0) if raw.get("solo_speedup") is not None else 1.0),
              float(raw.get("latency_us") or 0.0))
    for key in ("memory_gib", "hbm_gbs", "nvlink_gbs", "network_gbs", "gpus_per_node", "elementwise_gbs",
                "solo_speedup"):
        if getattr(gpu, key) is not None and getattr(gpu, key) <= 0:
            raise ConfigError(f"launcher.gpu_type={gpu_type}: {key}={getattr(gpu, key)} must be positive")
    if gpu.latency_us < 0:
        raise ConfigError(f"launcher.gpu_type={gpu_type}: latency_us={gpu.latency_us} must not be negative")
    if not any(v for v in peaks.values()):
        raise ConfigError(f"launcher.gpu_type={gpu_type}: peak_tflops gives no precision a rate")
    return gpu
