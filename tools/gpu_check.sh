#!/usr/bin/env bash
# One call on the GPU machine (see README, "GPU tests and benchmarks"): set up, build with CUDA, then run the steps
# named on the command line: tests (pytest -m cuda), sanitize (compute-sanitizer memcheck + racecheck on the CUDA
# op tests), ptx (a second build in a copy of the checkout with TORCH_CUDA_ARCH_LIST="8.0+PTX", which the GPU runs
# by JIT-compiling compute_80 PTX, and the CUDA op tests on it), bench (tools/experiments/benchmark_op.py), profile (ncu summary
# of every kernel on the benchmark workload), or a quoted command. Logs go to $OUT (or ./gpu-logs) when set.
# SKIP_DETECTRON2=1 skips installing Detectron2.
#
#   bash tools/gpu_check.sh tests sanitize bench
#
# Expects the pb1-detectron2 sdist and the wheels of the Python packages the machine lacks in .gpu/ (README says how).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-gpu-logs}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
OP_TESTS="tests/test_prroi_pool.py tests/test_prroi_pool_levels.py tests/test_op_hardening.py tests/test_iou_guided_nms.py tests/test_channels_last.py tests/test_refinement.py"
export PYTHONUNBUFFERED=1

step() { echo "== $* ($(date +%T))"; }

step "python deps into /tmp/site"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl
export PYTHONPATH=/tmp/site
if [ "${SKIP_DETECTRON2:-0}" != 1 ]; then step "detectron2"
python3 tools/install_detectron2.py --sdist .gpu/pb1-detectron2-0.6.tar.gz --target /tmp/site --no-deps \
  > "$LOG_DIR/install_detectron2.log" 2>&1 || { tail -20 "$LOG_DIR/install_detectron2.log"; exit 1; }; fi
step "build (CUDA, sm_90)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > "$LOG_DIR/build.log" 2>&1 \
  || { grep -E "error|Error" "$LOG_DIR/build.log" | head -40; exit 1; }
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import torch, prroi_d2._extension as e; print('torch', torch.__version__, 'built with CUDA',
  e.cuda_version(), 'kernels run as compute', torch.ops.prroi_d2._cuda_kernel_arch(0))"

# An error message with a number, raised by the ops, must come back as a ValueError. On the GPU machine (library
# built by /opt/gcc/bin/g++, GCC 13.3) it crashed instead (SIGSEGV while formatting the number) unless the
# compiler's libstdc++ (there /lib/x86_64-linux-gnu/libstdc++.so.6) is preloaded: the process otherwise resolves
# libstdc++ to another copy first. Then it is preloaded for the steps below, and said so.
probe='import torch, prroi_d2
try:
    torch.ops.prroi_d2.prroi_pool2d(torch.ones(1, 1, 2, 2), torch.zeros(1, 5), 0, 1, 1.0, False)
except ValueError:
    print("ok")'
if [ "$(python3 -c "$probe" 2>/dev/null)" != ok ]; then
  cxx=${CXX:-$(command -v c++ || command -v g++)}
  lib=$("$cxx" -print-file-name=libstdc++.so.6)
  echo "raising an error with a number crashed; preloading the libstdc++ of $cxx: $lib"
  export LD_PRELOAD=$lib
  if [ "$(python3 -c "$probe" 2>/dev/null)" = ok ]; then
    echo "... now raised as ValueError"
  else  # leave out the CUDA tests that raise such errors, so that the others run
    export EXTRA_K="not test_cuda_sizes_beyond and not (spatial_scale_out and cuda)"
    echo "... still crashes: CUDA op tests run with -k \"$EXTRA_K\""
  fi
fi

status=0
for what in "$@"; do
  case "$what" in
    tests)
      step "CUDA tests"
      python3 -m pytest tests -m cuda -q -p no:cacheprovider ${EXTRA_K:+-k "$EXTRA_K"} 2>&1 | tee "$LOG_DIR/cuda_tests.log" | tail -25 \
        || status=1 ;;
    sanitize)
      for tool in memcheck racecheck; do
        step "compute-sanitizer --tool $tool"
        # shellcheck disable=SC2086
        compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest $OP_TESTS -m cuda -q \
          -p no:cacheprovider -k "not compile and not gradcheck and not opcheck${EXTRA_K:+ and $EXTRA_K}" \
          > "$LOG_DIR/sanitizer_$tool.log" 2>&1 \
          || status=1
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$LOG_DIR/sanitizer_$tool.log" | tail -3
      done ;;
    profile)
      step "ncu (one call of each kernel per FPN level, 1000 RoIs, 7x7 then 14x14)"
      ncu --kernel-name regex:"roi_align_forward|forward_kernel|features_backward_kernel|rois_backward_kernel" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis python3 tools/experiments/benchmark_op.py --profile --rois 1000 --sizes 7 14 \
        > "$LOG_DIR/ncu.log" 2>&1 || status=1
      grep -E "^  [a-z_:<>, ()0-9A-Za-z]+\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|L1/TEX Hit|L2 Hit" \
        "$LOG_DIR/ncu.log" | sed -E 's/void prroi_d2::cuda::\(anonymous namespace\)::|void at::native::\(anonymous namespace\)::|void vision::ops::\(anonymous namespace\)::|\(int, const T1 \*.*//' \
        | cut -c1-110 > "$LOG_DIR/ncu_summary.txt"; cat "$LOG_DIR/ncu_summary.txt" ;;
    ptx)
      step "build (CUDA, TORCH_CUDA_ARCH_LIST=8.0+PTX) in /tmp/prroi_ptx"
      rm -rf /tmp/prroi_ptx && mkdir -p /tmp/prroi_ptx
      cp -r prroi_d2 tests tools setup.py pyproject.toml /tmp/prroi_ptx/
      rm -f /tmp/prroi_ptx/prroi_d2/_C*.so
      (cd /tmp/prroi_ptx && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0+PTX" MAX_JOBS=16 python3 setup.py build_ext \
        --inplace > "$LOG_DIR/build_ptx.log" 2>&1) || { grep -E "error|Error" "$LOG_DIR/build_ptx.log" | head -40; exit 1; }
      step "CUDA op tests, 8.0+PTX build"
      # shellcheck disable=SC2086
      (cd /tmp/prroi_ptx && PYTHONPATH=/tmp/prroi_ptx:/tmp/site python3 -c "import torch, prroi_d2._extension as e
e.load(); print('8.0+PTX build: kernels run as compute', torch.ops.prroi_d2._cuda_kernel_arch(0))" \
        && PYTHONPATH=/tmp/prroi_ptx:/tmp/site python3 -m pytest $OP_TESTS -m cuda -q -p no:cacheprovider \
        ${EXTRA_K:+-k "$EXTRA_K"}) 2>&1 \
        | tee "$LOG_DIR/cuda_tests_ptx.log" | tail -25 || status=1 ;;
    bench)
      step "benchmark"
      python3 tools/experiments/benchmark_op.py --device cuda 2>&1 | tee "$LOG_DIR/benchmark.log" || status=1 ;;
    *)
      step "$what"
      bash -c "$what" || status=1 ;;
  esac
done
exit $status
