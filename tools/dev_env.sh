#!/usr/bin/env bash
# Creates or refreshes the development environment .venv (used by `make demo` and `make test`):
#   1. a Python 3.11+ venv with the pinned packages of requirements/dev.txt, pip's machine-local configuration
#      ignored (no find-links wheel, no local constraint can replace a pinned release);
#   2. Detectron2, through tools/install_detectron2.py (an existing install, else the pb1-detectron2 0.6 sources:
#      ../shared/deps/pb1-detectron2-0.6.tar.gz when present, else PyPI);
#   3. the compiled ops, CPU and CUDA (nvcc 13.2 from the pinned nvidia-cuda-nvcc package, sm_90), in place.
# Steps 1-2 are skipped when requirements, installer and Python are unchanged; step 3 is incremental (ninja).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${PRROI_D2_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= PIP_DISABLE_PIP_VERSION_CHECK=1

stamp_now=$( (cat requirements/dev.txt tools/install_detectron2.py; "$PYTHON" --version) | sha256sum | cut -c1-16)
if [ ! -x "$PY" ] || [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$stamp_now" ]; then
  echo "dev_env: creating $VENV (pinned packages, a few minutes the first time)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install -q -r requirements/dev.txt
  sdist=$ROOT/../shared/deps/pb1-detectron2-0.6.tar.gz
  if [ -f "$sdist" ]; then
    "$PY" tools/install_detectron2.py --sdist "$sdist"
  else
    "$PY" tools/install_detectron2.py
  fi
  echo "$stamp_now" > "$VENV/.stamp"
fi

# The CUDA toolkit that matches torch's CUDA headers comes from the pinned pip packages.
CUDA_HOME=$("$PY" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")
if [ -x "$CUDA_HOME/bin/nvcc" ]; then
  ln -sf libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
  [ -e "$CUDA_HOME/lib64" ] || ln -s lib "$CUDA_HOME/lib64"
  export CUDA_HOME FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace --build-temp "$VENV/build" > "$VENV/build.log" 2>&1 || {
  grep -E -A3 "error" "$VENV/build.log" | head -60; echo "dev_env: building the ops failed (log: $VENV/build.log)"; exit 1; }
echo "dev_env: ready ($("$PY" -c 'import prroi_d2._extension as e; print("ops built with CUDA", e.cuda_version() or "none")'))"
