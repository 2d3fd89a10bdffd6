#!/usr/bin/env bash
# Every GPU check in one go, on a machine with an NVIDIA GPU, from the repository root:
#
#   scripts/gpu-check.sh
#
# 1. nvidia-smi lists a GPU, redis-server is there (`make redis-server`), and $VENV (default
#    .venv; created with `make install TORCH_SPEC=torch` when missing) has a torch that sees CUDA;
# 2. every GPU-marked test (`pytest -m gpu`: the dtype policy on CUDA, a job on a pinned GPU
#    worker, CUDA out of memory); a skipped one counts as a failure here;
# 3. the GPU path's CPU-side tests (tests/test_gpu_launch.py) against this machine's CUDA torch;
# 4. the GPU benchmark (benchmarks/bench_gpu_training.py --quick), with its busy fraction <= 1.
#
# Prints PASS/FAIL per check and exits non-zero if any failed. Logs and the benchmark's JSON go
# to $GPU_CHECK_OUT (default: a new temporary directory). Each step has a time limit; all of
# them together stay under 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
case $VENV in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PY="$VENV/bin/python"
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t graftq-gpu-check.XXXXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PATH="$VENV/bin:$PATH"
SUMMARY=()
FAILED=0

check() {  # check NAME COMMAND...: run it, log to $OUT/NAME.log, record PASS or FAIL
    local name=$1 status
    shift
    echo "=== $name"
    "$@" 2>&1 | tee "$OUT/$name.log"
    status=${PIPESTATUS[0]}
    if [ "$status" -eq 0 ]; then
        SUMMARY+=("PASS  $name")
    else
        SUMMARY+=("FAIL  $name (status $status; log: $OUT/$name.log)")
        FAILED=1
    fi
    return "$status"
}

finish() {
    echo
    echo "==================== gpu-check summary ===================="
    printf '%s\n' "${SUMMARY[@]}"
    if [ "$FAILED" -eq 0 ]; then echo "PASS: every GPU check passed"; else echo "FAIL: see the logs in $OUT"; fi
    exit "$FAILED"
}

venv_with_cuda() {
    if [ ! -x "$PY" ]; then
        make install VENV="$VENV" TORCH_SPEC=torch || return 1
    fi
    "$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    sys.exit(f"torch {torch.__version__} ({build}) sees no CUDA device: check the driver with nvidia-smi, or "
             "replace a CPU-only torch: make clean-venv && make install TORCH_SPEC=torch")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}")
EOF
}

gpu_tests() {  # skips count as failures: on a GPU machine every GPU test must run
    timeout 300 "$PY" -m pytest -m gpu -rs -p no:cacheprovider tests/ | tee "$OUT/pytest-gpu.out"
    [ "${PIPESTATUS[0]}" -eq 0 ] && ! grep -q '^SKIPPED' "$OUT/pytest-gpu.out"
}

gpu_benchmark() {
    timeout 180 "$PY" benchmarks/bench_gpu_training.py --quick --json "$OUT/gpu_training.json" || return 1
    "$PY" - "$OUT/gpu_training.json" <<'EOF'
import json
import sys

figures = json.load(open(sys.argv[1]))["figures"]
busy = figures["gpu_busy_fraction (kernel time / wall)"]
if not 0 < busy <= 1:
    sys.exit(f"gpu_busy_fraction {busy} is outside (0, 1]: kernel time is miscounted")
EOF
}

check nvidia_smi nvidia-smi -L || finish
check redis_server make --no-print-directory redis-server || finish
check venv_with_cuda venv_with_cuda || finish
check gpu_tests gpu_tests
check gpu_launch_tests timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_launch.py
check gpu_benchmark gpu_benchmark
finish
