"""Which training precisions this machine's device can run: a fact about the device, known before
anything starts.

The answer comes from DeepSpeed's accelerator (CUDA when there is a GPU, else CPU: the device a run
trains on), through the same calls its engine makes before it refuses a 16-bit run, so it can never
disagree with that refusal. On CPU, fp16 needs oneDNN's fp16 kernels, which many x86 CPUs (AMD EPYC
among them) lack; on CUDA, fp16 needs compute capability 7.0 and bf16 a GPU that has it.
"""
import os
from typing import Optional

# Tests force the answer either way: "fp16=no" or "fp16=yes,bf16=no"; unnamed precisions are asked.
FORCE_ENV = "BLOOM_TEST_PRECISION_SUPPORT"
ANSWERS = {"yes": True, "no": False}
# The checks DeepSpeedEngine._do_sanity_check makes before it refuses a 16-bit engine.
ACCELERATOR_CHECKS = {"fp16": "is_fp16_supported", "bf16": "is_bf16_supported"}


def _forced(precision: str) -> Optional[bool]:
    for entry in filter(None, (e.strip() for e in os.environ.get(FORCE_ENV, "").split(","))):
        name, _, answer = entry.partition("=")
        if answer not in ANSWERS:
            raise ValueError(f"{FORCE_ENV}={os.environ[FORCE_ENV]}: expected entries like fp16=yes or fp16=no")
        if name == precision:
            return ANSWERS[answer]
    return None


def _why_not(accelerator, precision: str) -> str:
    import torch  # only a CUDA answer needs it; config checks stay free of torch's import

    name = accelerator.device_name()
    if name == "cpu" and precision == "fp16":
        return "CPU: oneDNN has no fp16 kernels here; DeepSpeed refuses fp16"
    if name == "cuda" and precision == "fp16":
        major, minor = torch.cuda.get_device_capability()
        return f"CUDA compute capability {major}.{minor} is below 7.0; DeepSpeed refuses fp16"
    if name == "cuda" and precision == "bf16":
        return f"{torch.cuda.get_device_name()} has no bf16; DeepSpeed refuses bf16"
    return f"DeepSpeed's {name} accelerator refuses {precision}"


def unsupported_reason(precision: str) -> Optional[str]:
    """None when this machine's device can train in `precision` (fp32, bf16, fp16), else why not."""
    forced = _forced(precision)
    if forced is not None:
        return None if forced else f"forced by {FORCE_ENV}"
    if precision == "fp32":
        return None
    # Imported here: it picks and announces its accelerator on first use, which only 16-bit needs.
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = getattr(accelerator, ACCELERATOR_CHECKS[precision])()  # CPU's fp16 says None for no
    return None if supported else _why_not(accelerator, precision)
