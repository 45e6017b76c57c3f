#!/usr/bin/env bash
# Build and install inplace-abn 1.1.0 into the given Python's environment.
# Its only release is an sdist from 2020: without help it reports version 0.0.0 (setuptools_scm finds no git
# metadata), and with a CUDA build of torch it also compiles CUDA kernels, which needs CUDA_HOME and an explicit
# TORCH_CUDA_ARCH_LIST when no GPU is visible. The pure-PyTorch fallback in segmentation/models/norm.py computes the
# same thing, so this build is optional for users; CI runs it so the equivalence test runs.
# IABN_VENDOR=<folder> builds offline from that folder (a machine without network, e.g. the GPU check's): it holds
# the sdist and setuptools_scm's wheel (`make gpu-vendor` puts them in vendor/); setuptools, wheel and ninja must be
# installed already.
set -euo pipefail
PY=${1:-python}
if "$PY" -c "import inplace_abn" 2>/dev/null; then
  echo "inplace-abn already installed"; exit 0
fi
if [ -n "${IABN_VENDOR:-}" ]; then
  "$PY" -c "import setuptools_scm" 2>/dev/null ||
    "$PY" -m pip install --quiet --no-index --no-deps --find-links "$IABN_VENDOR" setuptools_scm
  SOURCE="$IABN_VENDOR/inplace-abn-1.1.0.tar.gz"
  OFFLINE=(--no-index --no-deps)
else
  "$PY" -m pip install --quiet setuptools wheel setuptools_scm ninja
  SOURCE=inplace-abn==1.1.0
  OFFLINE=()
fi
if "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  if [ -z "${CUDA_HOME:-}" ]; then
    for candidate in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
      if [ -x "$candidate/bin/nvcc" ]; then export CUDA_HOME=$candidate; break; fi
    done
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
  echo "building inplace-abn with CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
fi
SETUPTOOLS_SCM_PRETEND_VERSION=1.1.0 MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --quiet --no-build-isolation "${OFFLINE[@]}" "$SOURCE"
"$PY" -c "import inplace_abn; print('inplace-abn', inplace_abn.__file__)"
