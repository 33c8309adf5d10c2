#!/usr/bin/env bash
# On a fresh CUDA machine, from the repository root: install, run the GPU tests and the CUDA
# benchmark, and leave everything under $OUT (default ./gpu-out).
#
#   OUT=/some/dir PEAK_GBS=4800 bash scripts/gpu_check.sh [--quick]
#
# Uses the machine's own CUDA-enabled torch when one is importable (a CPU wheel cannot run the
# GPU path); otherwise installs torch and triton from the package index into .venv-gpu.
set -uo pipefail
OUT="${OUT:-gpu-out}"
PEAK_GBS="${PEAK_GBS:-4800}"
QUICK="${1:-}"
mkdir -p "$OUT"
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PY=python3
    python3 -m pip install --quiet -e ".[test]" 2>&1 | tail -3
else
    python3 -m venv .venv-gpu
    PY=.venv-gpu/bin/python
    $PY -m pip install --quiet --upgrade pip
    $PY -m pip install --quiet torch "triton>=3" 2>&1 | tail -3
    $PY -m pip install --quiet -e ".[test]" 2>&1 | tail -3
fi
{
    nvidia-smi || true
    $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# the compiled kernels: no TRITON_INTERPRET in this process
env -u TRITON_INTERPRET $PY -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.txt"
env -u TRITON_INTERPRET $PY -m benchmarks.bn_cuda --peak-gbs "$PEAK_GBS" --json "$OUT/bn_cuda.json" $QUICK 2>&1 | tee "$OUT/bn_cuda.txt"
echo "results in $OUT"
