// CUDA backend: the recurrence driver of csrc/kernels/cuda with ATen's cuBLAS GEMM, on
// torch's current stream and cuBLAS handle, under a guard for the tensors' device.
//
// Lengths may live on the GPU: the kernels read them where they are, with no host sync and
// no range check (a negative length acts as 0, one above T as T; see recurrence.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDABlas.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../kernels/cuda/recurrence.cuh"
#include "rnn_op.h"

namespace fastrnn {
namespace {

// ATen's scalar type -> the element type the kernels see (same layout).
template <class T> struct Elem { using type = T; };
template <> struct Elem<at::Half> { using type = __half; };
template <> struct Elem<at::BFloat16> { using type = __nv_bfloat16; };

// The driver's GEMM (see recurrence.cuh) on column-major cuBLAS: the row-major product
// C = A op(W) is computed as C^T = op(W)^T A^T.
template <class T>
struct CudaGemm {
  using E = typename Elem<T>::type;
  using Acc = cuda::acc_t<E>;
  using Op = at::opmath_type<T>;

  cudaStream_t stream;
  // Half/BFloat16 with a float C: cuBLAS writes float directly when it can (compute
  // capability 8.0+ for bfloat16, and not with fp16 accumulation switched on); otherwise the
  // product goes through `scratch` in T and is added to C by ATen.
  bool float_out = true;
  at::Tensor scratch;

  template <class C>
  void operator()(int64_t M, int64_t N, int64_t K, const E* A, int64_t lda, const E* W,
                  int64_t ldw, bool trans_w, bool accumulate, C* out, int64_t ldc) const {
    if (M == 0 || N == 0) return;
    if (K == 0) {  // an empty sum: C = 0, or C unchanged
      if (!accumulate)
        C10_CUDA_CHECK(cudaMemset2DAsync(out, ldc * sizeof(C), 0, N * sizeof(C), M, stream));
      return;
    }
    const char tw = trans_w ? 't' : 'n';
    const T* a = reinterpret_cast<const T*>(A);
    const T* w = reinterpret_cast<const T*>(W);
    const Op beta = accumulate ? Op(1) : Op(0);
    if constexpr (std::is_same_v<C, E>) {
      at::cuda::blas::gemm<T>(tw, 'n', N, M, K, Op(1), w, ldw, a, lda, beta,
                              reinterpret_cast<T*>(out), ldc);
    } else {
      static_assert(std::is_same_v<C, Acc> && std::is_same_v<Acc, float>,
                    "fastrnn: a GEMM with a float result is only needed for Half/BFloat16");
      if (float_out) {
        at::cuda::blas::gemm<T, float>(tw, 'n', N, M, K, Op(1), w, ldw, a, lda, beta, out, ldc);
        return;
      }
      TORCH_INTERNAL_ASSERT(scratch.numel() >= M * N);
      T* s = scratch.mutable_data_ptr<T>();
      at::cuda::blas::gemm<T>(tw, 'n', N, M, K, Op(1), w, ldw, a, lda, Op(0), s, N);
      const at::Tensor prod = scratch.narrow(0, 0, M * N).view({M, N});
      at::Tensor c = at::from_blob(out, {M, N}, {ldc, 1}, scratch.options().dtype(at::kFloat));
      if (accumulate)
        c.add_(prod);
      else
        c.copy_(prod);
    }
  }
};

template <class T>
CudaGemm<T> make_gemm(const LoopTensors& a, const at::Tensor& like) {
  CudaGemm<T> g;
  g.stream = at::cuda::getCurrentCUDAStream();
  if constexpr (std::is_same_v<T, at::Half>) {
    g.float_out = !at::globalContext().allowFP16AccumulationCuBLAS();
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    g.float_out = at::cuda::getCurrentDeviceProperties()->major >= 8;
  }
  if (!g.float_out) {  // the largest float-result product: [B, max(G*H, H, P)]
    const Shapes& s = a.s;
    const int64_t n = s.B * std::max<int64_t>(s.G * s.H, s.P);
    g.scratch = at::empty({n}, like.options());
  }
  return g;
}

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

void cuda_forward_loop(const LoopTensors& a) {
  const c10::cuda::CUDAGuard guard(a.y.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(),
                                  "fastrnn_cuda_forward", [&] {
    using E = typename Elem<scalar_t>::type;
    const CudaGemm<scalar_t> gemm = make_gemm<scalar_t>(a, a.y);
    ForwardParams<E> p[2];
    for (int d = 0; d < a.s.D; ++d) p[d] = forward_params<scalar_t, E>(a, d);
    // The directions run one after the other on the stream, sharing one workspace.
    const int64_t n_acc = cuda::forward_workspace_acc(p[0], a.s.G);
    const int64_t n = cuda::forward_workspace(p[0]);
    at::Tensor ws_acc = at::empty({n_acc}, a.y.options().dtype(acc_scalar_type(a.y.scalar_type())));
    at::Tensor ws = at::empty({n}, a.y.options());
    for (int d = 0; d < a.s.D; ++d) {
      C10_CUDA_CHECK(cuda::forward(a.s.kind, p[d], gemm,
                                   static_cast<cuda::acc_t<E>*>(ws_acc.data_ptr()),
                                   static_cast<E*>(ws.data_ptr()), gemm.stream));
    }
  });
}

void cuda_backward_loop(const LoopTensors& a) {
  const c10::cuda::CUDAGuard guard(a.dgx.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dgx.scalar_type(),
                                  "fastrnn_cuda_backward", [&] {
    using E = typename Elem<scalar_t>::type;
    const CudaGemm<scalar_t> gemm = make_gemm<scalar_t>(a, a.dgx);
    BackwardParams<E> p[2];
    for (int d = 0; d < a.s.D; ++d) p[d] = backward_params<scalar_t, E>(a, d);
    const int64_t n_acc = cuda::backward_workspace_acc(p[0]);
    at::Tensor ws_acc =
        at::empty({n_acc}, a.dgx.options().dtype(acc_scalar_type(a.dgx.scalar_type())));
    for (int d = 0; d < a.s.D; ++d) {
      C10_CUDA_CHECK(cuda::backward(a.s.kind, p[d], gemm,
                                    static_cast<cuda::acc_t<E>*>(ws_acc.data_ptr()),
                                    gemm.stream));
    }
  });
}

TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("forward", &forward_op);
  m.impl("backward", &backward_op);
}

}  // namespace fastrnn
