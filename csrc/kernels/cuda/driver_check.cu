// Compile check of the CUDA recurrence driver (recurrence.cuh) for every dtype, with a GEMM
// that has the required interface and does nothing. Not part of the library: the build
// instantiates the driver in csrc/ops/cuda_loop.cu with ATen's batched GEMM;
// .ci/compile_cuda.sh compiles this file so the driver is checked with nvcc alone, without
// torch's headers.
#include <cstdint>

#include "recurrence.cuh"

namespace fastrnn {
namespace cuda {
namespace {

template <class T>
struct NullGemm {
  template <class C>
  void operator()(int64_t /*D*/, int64_t /*M*/, int64_t /*N*/, int64_t /*K*/, const T* /*A*/,
                  int64_t /*lda*/, int64_t /*sa*/, const T* /*W*/, int64_t /*ldw*/,
                  int64_t /*sw*/, bool /*trans_w*/, bool /*accumulate*/, C* /*out*/,
                  int64_t /*ldc*/, int64_t /*sc*/) const {}
};

}  // namespace

template <class T>
cudaError_t check_driver(CellKind kind, int D, cudaStream_t stream) {
  ForwardParams<T> fp[kMaxDirs];
  BackwardParams<T> bp[kMaxDirs];
  const cudaError_t e = forward(kind, fp, D, NullGemm<T>{}, static_cast<acc_t<T>*>(nullptr),
                                static_cast<T*>(nullptr), stream);
  if (e != cudaSuccess) return e;
  return backward(kind, bp, D, NullGemm<T>{}, static_cast<acc_t<T>*>(nullptr),
                  static_cast<T*>(nullptr), stream);
}

template cudaError_t check_driver<float>(CellKind, int, cudaStream_t);
template cudaError_t check_driver<double>(CellKind, int, cudaStream_t);
template cudaError_t check_driver<__half>(CellKind, int, cudaStream_t);
template cudaError_t check_driver<__nv_bfloat16>(CellKind, int, cudaStream_t);

}  // namespace cuda
}  // namespace fastrnn
