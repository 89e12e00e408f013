"""A side Python environment with transformers 4.x, jax (CPU), flax and torch (CPU): where
`BloomTokenizerFast` and the Flax BLOOM classes still live (transformers 5 removed Flax).

Built by the test suite itself, once per machine/CI run, and reused while complete: the venv is
written in place and a marker holding the requirements is written last, so a build that was
interrupted (no marker, or other requirements) is removed and made again. A file lock keeps two
pytest sessions from building it at once. A pip failure (PyPI unreachable, a version gone) fails
the test with one message; it never skips.

Where: $BLOOM_HF4_VENV, else $XDG_CACHE_HOME/bloom-pretrain/hf4-venv (~/.cache/...); 1.8 GB on
disk. Build time measured on the 2-core machines here (2026-11-30): 156 s with an empty pip cache
(PIP_NO_CACHE_DIR=1; torch from the pinned CPU wheel), 120 s with pip's cache warm. A CI that
keeps ~/.cache/bloom-pretrain between runs pays it once.
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The versions this suite verified (2026-11-30): transformers 4.57.6, jax 0.10.2, flax 0.12.8,
# torch 2.13.0 (pinned: an unpinned torch pulls a multi-GB CUDA build).
REQUIREMENTS = ["transformers>=4.57,<5", "jax[cpu]>=0.10,<0.11", "flax>=0.12,<0.13", "torch==2.13.0"]
MARKER = "bloom-hf4-complete.json"
IMPORT_CHECK = "import transformers, jax, flax, torch; print(transformers.__version__)"


def venv_dir() -> Path:
    if os.environ.get("BLOOM_HF4_VENV"):
        return Path(os.environ["BLOOM_HF4_VENV"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "bloom-pretrain" / "hf4-venv"


def _python(directory: Path) -> Path:
    return directory / "bin" / "python"


def _complete(directory: Path) -> bool:
    marker = directory / MARKER
    if not marker.is_file() or not _python(directory).exists():
        return False
    try:
        return json.loads(marker.read_text()).get("requirements") == REQUIREMENTS
    except ValueError:
        return False


def _run(command, what: str, timeout: int) -> str:
    try:
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"transformers-4 side environment: {what} took over {timeout} s", pytrace=False)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines()
                 if line.strip() and "is ignored: it is neither a file nor a directory" not in line]
        last = lines[-1] if lines else f"exit status {result.returncode}"
        pytest.fail(f"transformers-4 side environment: {what} failed (is PyPI reachable?): {last}",
                    pytrace=False)
    return result.stdout


def ensure_hf4_python() -> Path:
    """The side environment's python, built first if absent or incomplete."""
    directory = venv_dir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(directory):
            return _python(directory)
        shutil.rmtree(directory, ignore_errors=True)
        start = time.monotonic()
        _run([sys.executable, "-m", "venv", directory], "python -m venv", 300)
        _run([_python(directory), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *REQUIREMENTS], f"pip install {' '.join(REQUIREMENTS)}", 1800)
        version = _run([_python(directory), "-c", IMPORT_CHECK], "importing transformers/jax/flax/torch", 300)
        seconds = round(time.monotonic() - start, 1)
        (directory / MARKER).write_text(json.dumps({"requirements": REQUIREMENTS, "build_seconds": seconds,
                                                    "transformers": version.strip()}) + "\n")
        print(f"built the transformers-4 side environment {directory} in {seconds} s", file=sys.stderr)
        return _python(directory)


def run_side(python: Path, script: str, *args, timeout: int = 600) -> dict:
    """Run `script` (Python source) with the side environment's python; it prints one JSON
    object as its last stdout line, which is returned. Any failure is one pytest failure
    carrying the script's stderr tail."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", TF_CPP_MIN_LOG_LEVEL="3",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([str(python), "-c", script, *[str(a) for a in args]], capture_output=True,
                            text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        pytest.fail(f"side-environment script failed (exit {result.returncode}):\n{result.stderr[-4000:]}",
                    pytrace=False)
    return json.loads(result.stdout.strip().splitlines()[-1])
