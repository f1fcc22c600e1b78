#!/usr/bin/env bash
# Compile check of the torch-free CUDA kernels (csrc/kernels/cuda/*.cu) with nvcc alone, for
# sm_80 and sm_90, warnings as errors. Needs no GPU and no CUDA build of torch. Every cell and
# dtype is compiled: pointwise.cu instantiates all kernels explicitly, driver_check.cu the
# recurrence driver. Skips (exit 0) only when nvcc is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
    NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  else
    echo "compile_cuda: SKIPPED: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)"
    exit 0
  fi
fi
echo "compile_cuda: $("$NVCC" --version | tail -n 1)"

# The same defines as the library build (cmake/cuda.cmake).
FLAGS=(-std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -Xcompiler -Wall,-Wextra
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)

shopt -s nullglob
sources=(csrc/kernels/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "compile_cuda: FAILED: no .cu files under csrc/kernels/cuda/" >&2
  exit 1
fi

failed=0 ok=0
for arch in sm_80 sm_90; do
  for src in "${sources[@]}"; do
    if "$NVCC" "${FLAGS[@]}" -arch="$arch" -c "$src" -o /dev/null; then
      echo "compile_cuda: ok     $arch $src"
      ok=$((ok + 1))
    else
      echo "compile_cuda: FAILED $arch $src" >&2
      failed=$((failed + 1))
    fi
  done
done
if (( failed > 0 )); then
  echo "compile_cuda: FAILED: $failed of $((ok + failed)) compiles" >&2
  exit 1
fi
echo "compile_cuda: all $ok compiles ok"
