#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU, a CUDA build of torch, nvcc, cmake, ninja,
# pybind11 and scikit-build-core already installed (no network needed):
#   1. builds and installs fastrnn with its CUDA kernels (FASTRNN_CUDA=ON: no silent CPU-only build),
#   2. compile-checks every .cu under csrc/ (.ci/compile_cuda.sh: the kernels with nvcc alone,
#      the op layer with torch's headers),
#   3. runs the whole test suite (tests/test_cuda.py is the CUDA part),
#   4. runs compute-sanitizer (memcheck, racecheck) over .ci/sanitize_cuda.py, a small
#      forward + backward of every cell, when compute-sanitizer is on PATH,
#   5. benchmarks against torch.nn (cuDNN): float32 (TF32 off on both sides) and bfloat16,
#      B = 1, 16, 64, T = 100 and 1024, H = 256, 512, 768, and variable lengths against
#      cuDNN on a PackedSequence (about 10-15 minutes on an H100), and a few shapes with the
#      persistent kernels (bench_rnn.py --cuda-persistent).
# Logs, the JUnit report, bench JSON and PNG go to $OUT when set, else to bench/results/gpu_check/;
# so does a copy of the built extension module (_C*.so).
# Optional:
#   FASTRNN_CUDA_ARCHS=90 (say) to build for fewer architectures than torch's list;
#   GPU_CHECK_STEPS="build compile tests sanitize bench" (the default: all) to run some steps,
#     e.g. a short time limit per call: "build tests" in one call, "sanitize bench" in the next;
#   GPU_CHECK_PREBUILT=DIR: no build; use the extension module DIR/_C*.so (from an earlier
#     build of the same sources, for this machine's Python) with python/fastrnn on PYTHONPATH;
#   GPU_CHECK_TESTS="-n 14 tests/" (say): pytest's arguments (default tests/);
#   GPU_CHECK_BENCH=0 skips the benchmark.
# Exit status: non-zero if any step failed (later steps still run once the build works).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT_DIR"
status=0
STEPS=" ${GPU_CHECK_STEPS:-build compile tests sanitize bench} "
step() { [[ "$STEPS" == *" $1 "* ]]; }

{
  echo "== $(date -u +%FT%TZ)"
  nvidia-smi || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} 2>&1 | tee "$OUT_DIR/env.txt"

if [[ -n "${GPU_CHECK_PREBUILT:-}" ]]; then
  echo "== prebuilt extension module from $GPU_CHECK_PREBUILT"
  site="$(mktemp -d)"
  cp -r python/fastrnn "$site/" && cp "$GPU_CHECK_PREBUILT"/_C*.so "$site/fastrnn/" || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
elif step build; then
  echo "== build"
  defines=(--config-settings=cmake.define.FASTRNN_CUDA=ON)
  if [[ -n "${FASTRNN_CUDA_ARCHS:-}" ]]; then
    defines+=("--config-settings=cmake.define.FASTRNN_CUDA_ARCHS=${FASTRNN_CUDA_ARCHS}")
  fi
  if ! python -m pip install --no-build-isolation -v "${defines[@]}" -e . > "$OUT_DIR/build.log" 2>&1; then
    tail -n 60 "$OUT_DIR/build.log"
    echo "gpu_check: FAILED: build (full log in $OUT_DIR/build.log)"
    exit 1
  fi
  grep -E "fastrnn:|PyTorch: CUDA" "$OUT_DIR/build.log" || true
  cp build/*/_C*.so "$OUT_DIR/" 2>/dev/null || true
fi
if ! python -c "import fastrnn.ops as o, sys; sys.exit(0 if o._C.cuda else 1)"; then
  echo "gpu_check: FAILED: fastrnn has no CUDA kernels (see $OUT_DIR/build.log)"
  exit 1
fi

if step compile; then
  echo "== compile check of every CUDA source (kernels alone, op layer with torch's headers)"
  REQUIRE_TORCH=1 bash .ci/compile_cuda.sh 2>&1 | tee "$OUT_DIR/compile_cuda.log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi

if step tests; then
  echo "== tests"
  read -r -a test_targets <<< "${GPU_CHECK_TESTS:-tests/}"
  python -m pytest -q -rs "${test_targets[@]}" --junitxml="$OUT_DIR/pytest.xml" 2>&1 \
    | tee "$OUT_DIR/pytest.log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi

if step sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool"
      compute-sanitizer --tool "$tool" --error-exitcode 9 python .ci/sanitize_cuda.py \
        > "$OUT_DIR/sanitize_$tool.log" 2>&1
      rc=$?
      tail -n 2 "$OUT_DIR/sanitize_$tool.log"
      [[ $rc -eq 0 ]] || { echo "gpu_check: compute-sanitizer $tool failed (rc $rc)"; status=1; }
    done
  else
    echo "== compute-sanitizer not found: skipped"
  fi
fi

if step bench && [[ "${GPU_CHECK_BENCH:-1}" != 0 ]]; then
  shapes=""
  for B in 1 16 64; do for T in 100 1024; do for H in 256 512 768; do
    shapes+="${shapes:+;}$B,$T,$H,$H"
  done; done; done
  for dtype in float32 bfloat16; do
    echo "== benchmark ($dtype)"
    python bench/bench_rnn.py --device cuda --dtype "$dtype" --cells lstm,gru,rnn \
      --modes inference,training,varlen --shapes "$shapes" --repeats 5 --warmup 2 \
      --json "$OUT_DIR/bench_$dtype.json" --png "$OUT_DIR/bench_$dtype.png" 2>&1 \
      | tee "$OUT_DIR/bench_$dtype.log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
    echo "== benchmark ($dtype, persistent kernels)"
    python bench/bench_rnn.py --device cuda --dtype "$dtype" --cuda-persistent --cells lstm,gru \
      --modes inference,training,varlen --shapes "1,100,256,256;16,1024,768,768;64,256,512,512" \
      --repeats 5 --warmup 2 --json "$OUT_DIR/bench_${dtype}_persistent.json" 2>&1 \
      | tee "$OUT_DIR/bench_${dtype}_persistent.log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  done
fi

if [[ $status -eq 0 ]]; then
  echo "gpu_check: all steps passed; logs in $OUT_DIR"
else
  echo "gpu_check: FAILED: see the logs in $OUT_DIR"
fi
exit $status
