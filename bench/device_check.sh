#!/usr/bin/env bash
# One-shot GPU check of the CUDA quantizer kernels (custom_ops/cuda), for a session that is lent a GPU machine.
#
#   bash bench/device_check.sh            # writes its logs to $OUT (the device tool's folder) or ./device_check_out
#
# Steps (each logged; a failing step does not stop the later ones; the last line sums them up):
#   1. nvidia-smi                                   -> gpu.txt
#   2. build custom_ops with its CUDA part          -> build.log   (build/device; architectures 80-real;90)
#   3. tests/ops/test_cuda_parity.py                -> parity.log, parity.xml
#      (CUDA vs numpy reference, vs the CPU kernels through onnxruntime, argument checks; the ORT-CUDA-provider
#       test runs only where onnxruntime has CUDAExecutionProvider)
#   4. bench/cuda_ops.py, 16M elements              -> bench.txt, bench.json
#   5. compute-sanitizer memcheck + racecheck on a small subset of the parity tests -> sanitizer.log
# Expected run time on an H100 with 16 cores: about 3-5 minutes (call it with timeout_s of 480 or more).
#
# Needs on the machine: nvcc, cmake, python3 with numpy and pytest (onnx + onnxruntime for the CPU comparison).
# ONNX Runtime headers (for libonnxqat_ops.so): $ORT_INCLUDE_DIR, else ./.ortinc, else build/*/_ortdeb (a CMake
# build's download), else /usr/include/onnxruntime. The device machine has no network: before the run, here,
#   mkdir -p .ortinc && cp -r <dir holding onnxruntime_cxx_api.h>/. .ortinc/ && echo /.ortinc/ >> .git/info/exclude
# and name .ortinc in the run's carry. Without headers only libonnxqat_cuda_kernels.so is built (steps 3-5 still
# run; the CPU comparison is skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
JOBS="$(nproc 2>/dev/null || echo 4)"
export PYTHONUNBUFFERED=1
status=()

step() {  # step NAME RC
  status+=("$1=$2")
  echo "== $1: rc=$2"
}

# 1 --------------------------------------------------------------------------------------------------- GPU
{ nvidia-smi; nvcc --version; cmake --version; "$PY" -c "import numpy, sys; print(sys.version, numpy.__version__)"; \
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"; } \
  > "$OUT/gpu.txt" 2>&1
step gpu $?

# 2 ------------------------------------------------------------------------------------------------- build
ort_dir=""
for d in "${ORT_INCLUDE_DIR:-}" "$PWD/.ortinc" $(ls -d build/*/_ortdeb/x/usr/include/onnxruntime 2>/dev/null) \
         /usr/include/onnxruntime; do
  if [ -n "$d" ] && [ -f "$d/onnxruntime_cxx_api.h" ]; then ort_dir="$d"; break; fi
done
BUILD=build/device
if [ -n "$ort_dir" ]; then
  echo "ORT headers: $ort_dir" > "$OUT/build.log"
  cmake -S custom_ops -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR="$ort_dir" >> "$OUT/build.log" 2>&1 \
    && cmake --build "$BUILD" -j "$JOBS" >> "$OUT/build.log" 2>&1
  rc=$?
  export ONNXQAT_OPS_LIBRARY="$PWD/$BUILD/libonnxqat_ops.so"
  export ONNXQAT_CUDA_KERNELS="$PWD/$BUILD/cuda/libonnxqat_cuda_kernels.so"
else
  echo "no ORT headers: building libonnxqat_cuda_kernels.so only" > "$OUT/build.log"
  cmake -S custom_ops/cuda -B "$BUILD-kernels" -DCMAKE_BUILD_TYPE=Release -DONNXQAT_CUDA_KERNELS_ONLY=ON \
    >> "$OUT/build.log" 2>&1 && cmake --build "$BUILD-kernels" -j "$JOBS" >> "$OUT/build.log" 2>&1
  rc=$?
  export ONNXQAT_CUDA_KERNELS="$PWD/$BUILD-kernels/libonnxqat_cuda_kernels.so"
fi
step build $rc
tail -n 5 "$OUT/build.log"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 3 ------------------------------------------------------------------------------------------------ parity
"$PY" -m pytest -q -rs -p no:cacheprovider tests/ops/test_cuda_parity.py --junitxml="$OUT/parity.xml" \
  > "$OUT/parity.log" 2>&1
step parity $?
tail -n 25 "$OUT/parity.log"

# 4 ------------------------------------------------------------------------------------------------- bench
"$PY" bench/cuda_ops.py --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
step bench $?
cat "$OUT/bench.txt"

# 5 --------------------------------------------------------------------------------------------- sanitizer
if command -v compute-sanitizer > /dev/null; then
  subset="test_lsq_matches_reference and 15.0-1 or test_sat_act_optional or test_sat_weight_all_zero or test_lsq_optional"
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck; do
    timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 99 \
      "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_cuda_parity.py -k "$subset" >> "$OUT/sanitizer.log" 2>&1
    step "sanitizer-$tool" $?
  done
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log"
else
  step sanitizer "skipped (no compute-sanitizer)"
fi

echo "device_check: ${status[*]}" | tee "$OUT/summary.txt"
