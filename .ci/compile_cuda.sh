#!/usr/bin/env bash
# Compile check of every CUDA source under csrc/ with nvcc, for sm_80 and sm_90, warnings as
# errors. Needs no GPU and no CUDA build of torch:
#   - the torch-free kernels (csrc/kernels/**/*.cu) with nvcc alone. Every cell and dtype is
#     compiled: pointwise.cu instantiates all kernels explicitly, driver_check.cu the
#     recurrence driver.
#   - the op layer (every other .cu, e.g. csrc/ops/cuda_loop.cu) with the headers of the
#     installed torch, CPU wheel included: the op layer needs only torch's own headers and the
#     CUDA runtime headers nvcc brings (no cuBLAS/cuSPARSE/cuSOLVER headers).
# Skips (exit 0) when nvcc is missing. When torch is not installed, skips the op layer with a
# message, unless REQUIRE_TORCH=1 (then that is a failure). PYTHON names the interpreter whose
# torch is used (default: python, else python3).
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

# The same language flags and defines as the library build (cmake/cuda.cmake).
FLAGS=(-std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -Xcompiler -Wall,-Wextra
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)

kernels=() ops=()
while IFS= read -r src; do
  if [[ "$src" == csrc/kernels/* ]]; then kernels+=("$src"); else ops+=("$src"); fi
done < <(find csrc -name '*.cu' | LC_ALL=C sort)
if (( ${#kernels[@]} == 0 )); then
  echo "compile_cuda: FAILED: no .cu files under csrc/kernels/" >&2
  exit 1
fi

# torch's include directories (TORCH_INCLUDE_DIRS of its CMake config), found without
# importing torch. Torch's headers are system headers: their warnings are not ours.
TORCH_FLAGS=() torch_note=""
if (( ${#ops[@]} > 0 )); then
  PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"
  torch_dir=""
  if [[ -n "$PYTHON" ]]; then
    torch_dir="$("$PYTHON" -c "import importlib.util as u; s = u.find_spec('torch'); \
print(s.submodule_search_locations[0] if s else '')" 2>/dev/null || true)"
  fi
  if [[ -n "$torch_dir" && -f "$torch_dir/include/c10/cuda/CUDAStream.h" ]]; then
    TORCH_FLAGS=(-isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include"
                 -DFASTRNN_WITH_CUDA
                 # Only a CUDA build of torch generates c10/cuda/impl/cuda_cmake_macros.h; its
                 # one macro matters for Windows DLLs alone.
                 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
    torch_note=" (torch headers: $torch_dir/include)"
  elif [[ "${REQUIRE_TORCH:-0}" == 1 ]]; then
    echo "compile_cuda: FAILED: torch (with its c10/cuda headers) not found by ${PYTHON:-python}," \
         "needed for ${ops[*]}" >&2
    exit 1
  else
    echo "compile_cuda: SKIPPED the op layer (${ops[*]}): torch is not installed for" \
         "${PYTHON:-python} yet; install it first (pip install torch==2.13.0) to compile it"
    ops=()
  fi
fi

failed=0 ok=0
compile() {  # arch source [extra flags...]
  local arch="$1" src="$2"
  shift 2
  if "$NVCC" "${FLAGS[@]}" "$@" -arch="$arch" -c "$src" -o /dev/null; then
    echo "compile_cuda: ok     $arch $src"
    ok=$((ok + 1))
  else
    echo "compile_cuda: FAILED $arch $src" >&2
    failed=$((failed + 1))
  fi
}
if [[ -n "$torch_note" ]]; then echo "compile_cuda: op layer$torch_note"; fi
for arch in sm_80 sm_90; do
  for src in "${kernels[@]}"; do compile "$arch" "$src"; done
  for src in "${ops[@]+"${ops[@]}"}"; do compile "$arch" "$src" "${TORCH_FLAGS[@]}"; done
done
if (( failed > 0 )); then
  echo "compile_cuda: FAILED: $failed of $((ok + failed)) compiles" >&2
  exit 1
fi
echo "compile_cuda: all $ok compiles ok"
