#!/usr/bin/env bash
# On a CUDA machine, from the repository root: run the GPU tests and the CUDA benchmark and
# leave everything under $OUT (default ./gpu-out). Works offline: it uses the machine's own
# CUDA-enabled torch and triton and puts src/ on the path instead of downloading anything.
#
#   OUT=/some/dir PEAK_GBS=4800 bash scripts/gpu_check.sh [--quick]
set -uo pipefail
OUT="${OUT:-gpu-out}"
PEAK_GBS="${PEAK_GBS:-4800}"
QUICK="${1:-}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter
if ! $PY -c 'import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: needs a python ($PY) whose torch sees a CUDA device and which has triton" | tee "$OUT/env.txt"
    exit 1
fi
{
    nvidia-smi || true
    $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
$PY -m pytest -q -m gpu tests/test_kernels_triton.py 2>&1 | tee "$OUT/pytest_gpu.txt"
$PY -m benchmarks.bn_cuda --peak-gbs "$PEAK_GBS" --json "$OUT/bn_cuda.json" $QUICK 2>&1 | tee "$OUT/bn_cuda.txt"
echo "results in $OUT"
