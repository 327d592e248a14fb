#!/usr/bin/env bash
# One GPU run for issue 4: the GEMM benchmark, the end-to-end benchmark, kernel tests on the device (<= 330 s).
# Usage (on the device machine, repo root): bash benchmarks/gpu_run.sh   (writes into $OUT, default benchmarks/results)
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
export DGQ_TRITON_TUNED=/tmp/dgq_tuned.json  # gemm writes the tuned configs, e2e reuses them
rm -f "$DGQ_TRITON_TUNED"
unset TRITON_INTERPRET
T0=$(date +%s)
{
  echo "== env"; nvidia-smi -L; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
  echo "== gemm"
  timeout 180 python3 benchmarks/gpu_gemm.py --out "$OUT" --budget 150 --tuned "$DGQ_TRITON_TUNED"
  echo "gemm rc=$? at $(( $(date +%s) - T0 ))s"
  echo "== e2e"
  timeout 90 python3 benchmarks/gpu_e2e.py --out "$OUT"
  echo "e2e rc=$? at $(( $(date +%s) - T0 ))s"
  echo "== tests on the GPU (compiled kernels)"
  DGQ_TEST_TRITON_NATIVE=1 timeout 50 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py 2>&1 | tail -5
  echo "tests done at $(( $(date +%s) - T0 ))s"
} 2>&1 | tee "$OUT/gpu_run_log.txt"
