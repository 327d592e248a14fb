#!/usr/bin/env bash
# One GPU run for issue 4: GEMM benchmark, end-to-end benchmark, compiled-kernel tests, summary (<= 460 s in all;
# every step has a hard timeout). Usage (device machine, repo root): bash benchmarks/gpu_run.sh
# Writes into $OUT (default benchmarks/results): gpu_gemm.json/.png, gpu_e2e.json, gpu_tests.txt/.jsonl,
# gpu_summary.json, gpu_run_log.txt. The short table printed last comes from benchmarks/gpu_summary.py.
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
export DGQ_TRITON_TUNED=/tmp/dgq_tuned.json  # gemm writes the tuned configs, e2e reuses them
rm -f "$DGQ_TRITON_TUNED"
unset TRITON_INTERPRET
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 ))s"; }
{
  echo "== env"
  timeout 15 nvidia-smi -L
  timeout 20 python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
  echo "== gemm (cap 200 s)"
  timeout -k 5 200 python3 benchmarks/gpu_gemm.py --out "$OUT" --budget 150 --tuned "$DGQ_TRITON_TUNED"
  echo "gemm rc=$? at $(el)"
  echo "== e2e (cap 90 s)"
  timeout -k 5 90 python3 benchmarks/gpu_e2e.py --out "$OUT"
  echo "e2e rc=$? at $(el)"
  echo "== tests on the GPU, compiled kernels (mma/GEMV first, cap 55 s; then the rest, cap 60 s)"
  SEL="mma_and_gemv or byte_simd"
  export DGQ_TEST_LOG="$OUT/gpu_tests.jsonl"; rm -f "$DGQ_TEST_LOG"
  PYTHONPATH=src:benchmarks DGQ_TEST_TRITON_NATIVE=1 timeout -k 5 55 python3 -m pytest -q -p no:cacheprovider \
    -p gpu_pytest_live -rfE --tb=short -k "$SEL" tests/test_triton_kernel.py > "$OUT/gpu_tests.txt" 2>&1
  echo "tests (mma/gemv) rc=$? at $(el)"; tail -3 "$OUT/gpu_tests.txt"
  PYTHONPATH=src:benchmarks DGQ_TEST_TRITON_NATIVE=1 timeout -k 5 60 python3 -m pytest -q -p no:cacheprovider \
    -p gpu_pytest_live -rfE --tb=short -k "not ($SEL)" tests/test_triton_kernel.py >> "$OUT/gpu_tests.txt" 2>&1
  echo "tests (rest) rc=$? at $(el)"; tail -3 "$OUT/gpu_tests.txt"
  echo "== summary"
  timeout 15 python3 benchmarks/gpu_summary.py --out "$OUT"
  echo "done at $(el)"
} 2>&1 | tee "$OUT/gpu_run_log.txt"
