#!/usr/bin/env bash
# One command for a bare GPU machine: install what it lacks, run the GPU tests, print the speed table.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --models bloom-560m]
#
# Meant for a machine with no network, its own Python 3.12 and CUDA build of torch, and none of
# DeepSpeed, megatron-core or Hydra. The missing packages come from wheels/ in this tree (ignored by
# git, carried with the working tree; benchmarks/gpu_check_wheels.txt says how they were made) and
# are installed with pip --no-index into a scratch directory put first on PYTHONPATH, so the
# machine's own packages are left alone; the project itself runs from the tree (PYTHONPATH).
# Then: the tests that need CUDA (they skip elsewhere), and benchmarks/gpu_check.py, which times
# bloom-560m and bloom-1b7 (bf16, seq 2048, one GPU) against a plain HF loop and prints one table.
# Budget: under 8 minutes in all: variants that would start late are listed as skipped (--budget-s).
#
# Without a CUDA GPU it says so in one line and prints the reduced CPU version of the table
# (tiny model, fp32); tests/test_gpu_check.py runs it that way.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    exec "$PYTHON" benchmarks/gpu_check.py --cpu "$@"
fi

# Modules the project imports that such a machine lacks, and the wheels that provide them.
missing=$("$PYTHON" - <<'EOF'
import importlib.util
needed = ["deepspeed", "megatron.core", "hydra", "omegaconf", "antlr4", "pydantic", "pydantic_core",
          "annotated_types", "typing_inspection", "hjson", "transformers", "safetensors", "tokenizers",
          "xxhash", "yaml", "numpy"]
def present(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
print(" ".join(n for n in needed if not present(n)))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: installing from wheels/ (missing: $missing)"
    if ! ls wheels/*.whl >/dev/null 2>&1; then
        echo "gpu_check: error: no wheels/ folder in $ROOT; make it as benchmarks/gpu_check_wheels.txt says" >&2
        exit 1
    fi
    SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
    # deepspeed's wheel is pure Python (built with DS_BUILD_OPS=0): nothing compiles here.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cuda
# The carried versions win over the machine's own ones; check that the stack imports before timing.
"$PYTHON" -c 'import deepspeed, megatron.core, hydra, transformers, torch; print("gpu_check: torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| megatron-core", megatron.core.__version__, "| transformers", transformers.__version__, "|", torch.cuda.get_device_name(0))'

echo "gpu_check: GPU tests (tests that skip without CUDA)"
# A test module that cannot be imported here must not stop the others.
"$PYTHON" -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -k "gpu or cuda" \
    tests/test_kernels.py tests/test_kernels_auto_gpu.py || echo "gpu_check: GPU tests FAILED (see above); timing anyway"

# The whole script should end within 8 minutes: no new variant starts after 390 s from the script's
# start (a bloom-1b7 variant takes up to about 1.5 minutes to build, compile and time).
budget=$(( 390 - SECONDS )); [ "$budget" -lt 30 ] && budget=30
echo "gpu_check: timing (one table; ${SECONDS} s used so far, variants start within ${budget} s more)"
exec "$PYTHON" benchmarks/gpu_check.py --budget-s "$budget" "$@"
