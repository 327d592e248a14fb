#!/usr/bin/env bash
# One GPU run for issue 4: kernel tests on the device, the GEMM benchmark, the end-to-end benchmark.
# Usage (on the device machine, repo root): bash benchmarks/gpu_run.sh   (writes into $OUT, default benchmarks/results)
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
unset TRITON_INTERPRET
{
  echo "== env"; nvidia-smi -L; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
  echo "== gemm"
  timeout 230 python3 benchmarks/gpu_gemm.py --out "$OUT"
  echo "gemm rc=$?"
  echo "== e2e"
  timeout 170 python3 benchmarks/gpu_e2e.py --out "$OUT"
  echo "e2e rc=$?"
  echo "== tests on the GPU (compiled kernels)"
  DGQ_TEST_TRITON_NATIVE=1 timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py 2>&1 | tail -5
} 2>&1 | tee "$OUT/gpu_run_log.txt"
