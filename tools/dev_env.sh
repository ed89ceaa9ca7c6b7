#!/usr/bin/env bash
# Creates or refreshes the development environment .venv (used by `make demo` and `make test`):
#   1. a Python 3.11+ venv with the pinned packages of requirements/dev.txt, pip's machine-local configuration
#      ignored (no find-links wheel, no local constraint can replace a pinned release);
#   2. Detectron2, through tools/install_detectron2.py, from the pb1-detectron2 0.6 sdist kept in .venv/downloads/
#      (fetched from PyPI once, or copied from ../shared/deps/ where that exists); the tests of
#      tools/install_detectron2.py install the same file into throwaway folders;
#   3. the compiled ops, CPU and CUDA (nvcc 13.2 from the pinned nvidia-cuda-nvcc package, sm_90), in place.
# Steps 1-2 are skipped when requirements, installer and Python are unchanged; step 3 is incremental (ninja).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${PRROI_D2_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= PIP_DISABLE_PIP_VERSION_CHECK=1

SDIST=$VENV/downloads/pb1-detectron2-0.6.tar.gz
fetch_sdist() {
  mkdir -p "$VENV/downloads"
  if [ -f "$ROOT/../shared/deps/pb1-detectron2-0.6.tar.gz" ]; then
    cp "$ROOT/../shared/deps/pb1-detectron2-0.6.tar.gz" "$SDIST"
  else
    "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: pb1-detectron2==0.6 -d "$VENV/downloads" \
      || echo "dev_env: could not fetch the pb1-detectron2 sdist; the tests of tools/install_detectron2.py will skip"
  fi
}

stamp_now=$( (cat requirements/dev.txt tools/install_detectron2.py; "$PYTHON" --version) | sha256sum | cut -c1-16)
if [ ! -x "$PY" ] || [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$stamp_now" ]; then
  echo "dev_env: creating $VENV (pinned packages, a few minutes the first time)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install -q -r requirements/dev.txt
  fetch_sdist
  if [ -f "$SDIST" ]; then
    "$PY" tools/install_detectron2.py --sdist "$SDIST"
  else
    "$PY" tools/install_detectron2.py
  fi
  echo "$stamp_now" > "$VENV/.stamp"
fi
[ -f "$SDIST" ] || fetch_sdist  # an environment made before the sdist was kept

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
