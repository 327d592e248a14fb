#!/usr/bin/env bash
# Every row of the quality table in its own process (so peak RSS is per row), one after another.
# Usage: bash benchmarks/run_quality.sh [rows...]   (default: all rows, defaults first)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROWS=${*:-fp rtn dgq-dyn dgq-static dgq-dyn-nosmooth dgq-dyn-selective dgq-static-selective dgq-static-nosmooth \
  dgq-dyn-phase1 dgq-static-phase1 dgq-dyn-nosmooth-phase1 dgq-static-nosmooth-phase1 dgq-dyn-nosearch \
  dgq-static-nosearch dgq-w4a16 rtn-ceil rtn-w4a16 rtn-ceil-w4a16}
for r in $ROWS; do
  "$PY" benchmarks/quality.py --rows "$r" 2>&1 | grep -v "Loading weights\|calibrate:" || exit 1
done
