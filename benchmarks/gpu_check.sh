#!/usr/bin/env bash
# `make gpu-check`: everything GPU-related in one short run and one report (benchmarks/gpu_check.py says what).
# Runs with the Python that has torch: $GPU_CHECK_PYTHON, else python3 (the GPU machine's image), else python.
# `--rehearsal` runs every part shrunk on the CPU (`make gpu-check-rehearsal`, run by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_CHECK_PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with torch found; set GPU_CHECK_PYTHON=/path/to/python" >&2; exit 2
fi
exec "$PY" benchmarks/gpu_check.py "$@"
