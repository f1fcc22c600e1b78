// CUDA backend: the recurrence driver of csrc/kernels/cuda with ATen's batched GEMM (cuBLAS
// underneath), on torch's current stream, under a guard for the tensors' device.
//
// Headers: only torch's own (ATen, c10/cuda) and the CUDA runtime headers nvcc brings. The
// GEMMs are ATen ops (at::bmm_out, at::baddbmm_out), not cuBLAS calls, so nothing here
// includes ATen/cuda/CUDAContext.h, which needs the cuBLAS, cuSPARSE and cuSOLVER headers;
// CI compiles this file with nvcc and the headers of torch's CPU wheel (.ci/compile_cuda.sh).
//
// TF32: the float32 GEMMs, like torch's own matmuls, follow
// torch.backends.cuda.matmul.allow_tf32 (torch.set_float32_matmul_precision): plain FP32 by
// default, TF32 tensor cores when that allows it. (cuDNN's RNNs follow
// torch.backends.cudnn.allow_tf32 instead, which is on by default.)
//
// Lengths may live on the GPU: the kernels read them where they are, with no host sync and
// no range check (a negative length acts as 0, one above T as T; see recurrence.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../kernels/cuda/recurrence.cuh"
#include "rnn_op.h"

namespace fastrnn {
namespace {

// ATen's scalar type -> the element type the kernels see (same layout).
template <class T> struct Elem { using type = T; };
template <> struct Elem<at::Half> { using type = __half; };
template <> struct Elem<at::BFloat16> { using type = __nv_bfloat16; };

// The driver's GEMM (see recurrence.cuh), batched over the directions: the raw pointers are
// wrapped, without copies, in strided [D, rows, cols] tensors and handed to at::bmm_out /
// at::baddbmm_out, which run one cuBLAS strided-batched GEMM on the current stream.
template <class T>
struct AtenGemm {
  using E = typename Elem<T>::type;
  using Acc = cuda::acc_t<E>;

  AtenGemm(at::Device device_, at::ScalarType type_) : device(device_), type(type_) {}

  at::Device device;
  at::ScalarType type;  // T
  // Half/BFloat16 with a float C: ATen's GEMM writes float directly when cuBLAS can
  // (compute capability 8.0+ for bfloat16, and not with fp16 accumulation switched on);
  // otherwise the product goes through `scratch` in T and is added to C.
  bool float_out = true;
  at::Tensor scratch;

  // A tensor over memory the caller owns. The device is given, so nothing asks the driver
  // where the pointer lives.
  at::Tensor wrap(const void* ptr, at::IntArrayRef sizes, at::IntArrayRef strides,
                  at::ScalarType st) const {
    return at::for_blob(const_cast<void*>(ptr), sizes)
        .strides(strides)
        .target_device(device)
        .options(at::TensorOptions().dtype(st).device(device))
        .make_tensor();
  }

  template <class C>
  void operator()(int64_t D, int64_t M, int64_t N, int64_t K, const E* A, int64_t lda,
                  int64_t sa, const E* W, int64_t ldw, int64_t sw, bool trans_w,
                  bool accumulate, C* out, int64_t ldc, int64_t sc) const {
    constexpr bool same = std::is_same_v<C, E>;
    static_assert(same || std::is_same_v<C, Acc>, "fastrnn: C is T or acc_t<T>");
    if (D == 0 || M == 0 || N == 0) return;
    // out: [D, M, N], row stride ldc, batch stride sc.
    const at::Tensor c = wrap(out, {D, M, N}, {sc, ldc, 1}, same ? type : at::kFloat);
    if (K == 0) {  // an empty sum: C = 0, or C unchanged
      if (!accumulate) c.zero_();
      return;
    }
    // A: [D, M, K], row stride lda, batch stride sa. W: [D, N, K] (trans_w) or [D, K, N],
    // row stride ldw, batch stride sw.
    const at::Tensor a = wrap(A, {D, M, K}, {sa, lda, 1}, type);
    const at::Tensor w = trans_w ? wrap(W, {D, N, K}, {sw, ldw, 1}, type).transpose(1, 2)
                                 : wrap(W, {D, K, N}, {sw, ldw, 1}, type);
    at::Tensor cm = c;  // the out= overloads take a mutable reference
    if constexpr (same) {
      if (accumulate)
        at::baddbmm_out(cm, c, a, w);
      else
        at::bmm_out(cm, a, w);
    } else if (float_out) {
      if (accumulate)
        at::baddbmm_out(cm, c, a, w, at::kFloat);
      else
        at::bmm_out(cm, a, w, at::kFloat);
    } else {
      TORCH_INTERNAL_ASSERT(scratch.numel() >= D * M * N);
      at::Tensor prod = scratch.narrow(0, 0, D * M * N).view({D, M, N});
      at::bmm_out(prod, a, w);
      if (accumulate)
        cm.add_(prod);
      else
        cm.copy_(prod);
    }
  }
};

template <class T>
AtenGemm<T> make_gemm(const LoopTensors& a, const at::Tensor& like) {
  AtenGemm<T> g(like.device(), like.scalar_type());
  if constexpr (std::is_same_v<T, at::Half>) {
    // torch.backends.cuda.matmul.allow_fp16_accumulation: ATen then refuses a float result.
    g.float_out = !at::globalContext().allowFP16AccumulationCuBLAS();
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                          like.device().index()));
    g.float_out = major >= 8;
  }
  if (!g.float_out) {  // the largest float-result product: [D, B, max(G*H, P)]
    const Shapes& s = a.s;
    g.scratch = at::empty({s.D * s.B * std::max<int64_t>(s.G * s.H, s.P)}, like.options());
  }
  return g;
}

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

void cuda_forward_loop(const LoopTensors& a) {
  const c10::cuda::CUDAGuard guard(a.y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(),
                                  "fastrnn_cuda_forward", [&] {
    using E = typename Elem<scalar_t>::type;
    const AtenGemm<scalar_t> gemm = make_gemm<scalar_t>(a, a.y);
    const int D = static_cast<int>(a.s.D);
    ForwardParams<E> p[cuda::kMaxDirs];
    for (int d = 0; d < D; ++d) p[d] = forward_params<scalar_t, E>(a, d);
    // Both directions in every step's launches, each with its own slice of the workspaces.
    at::Tensor ws_acc = at::empty({cuda::forward_workspace_acc(p[0], a.s.G, D)},
                                  a.y.options().dtype(acc_scalar_type(a.y.scalar_type())));
    at::Tensor ws = at::empty({cuda::forward_workspace(p[0], D)}, a.y.options());
    auto* acc = static_cast<cuda::acc_t<E>*>(ws_acc.data_ptr());
    auto* work = static_cast<E*>(ws.data_ptr());
    cudaError_t err = cudaErrorNotSupported;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (cuda_persistent()) {
        err = cuda::forward_persistent(a.s.kind, p, D, acc, work, stream);
        if (err == cudaSuccess) count_cuda_persistent_run();
      }
    }
    if (err == cudaErrorNotSupported) err = cuda::forward(a.s.kind, p, D, gemm, acc, work, stream);
    C10_CUDA_CHECK(err);
  });
}

void cuda_backward_loop(const LoopTensors& a) {
  // Every tensor the kernels read must be on the device, or a kernel reads a host pointer.
  // backward_op's check_backward call sees x, the weights and gates/hprev only; this covers
  // the rest (metadata only, no sync).
  check_backward_rest(a.s, a.dgx, a.dy, a.dh_n, a.dc_n, a.lengths, a.cprev, at::Tensor());
  const c10::cuda::CUDAGuard guard(a.dgx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dgx.scalar_type(),
                                  "fastrnn_cuda_backward", [&] {
    using E = typename Elem<scalar_t>::type;
    const AtenGemm<scalar_t> gemm = make_gemm<scalar_t>(a, a.dgx);
    const int D = static_cast<int>(a.s.D);
    BackwardParams<E> p[cuda::kMaxDirs];
    for (int d = 0; d < D; ++d) p[d] = backward_params<scalar_t, E>(a, d);
    at::Tensor ws_acc = at::empty({cuda::backward_workspace_acc(p[0], a.s.G, D)},
                                  a.dgx.options().dtype(acc_scalar_type(a.dgx.scalar_type())));
    at::Tensor ws = at::empty({cuda::backward_workspace(p[0], a.s.G, D)}, a.dgx.options());
    auto* acc = static_cast<cuda::acc_t<E>*>(ws_acc.data_ptr());
    cudaError_t err = cudaErrorNotSupported;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (cuda_persistent()) {
        err = cuda::backward_persistent(a.s.kind, p, D, acc, stream);
        if (err == cudaSuccess) count_cuda_persistent_run();
      }
    }
    if (err == cudaErrorNotSupported) {
      err = cuda::backward(a.s.kind, p, D, gemm, acc, static_cast<E*>(ws.data_ptr()), stream);
    }
    C10_CUDA_CHECK(err);
  });
}

TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("forward", &forward_op);
  m.impl("backward", &backward_op);
  m.impl("ln_forward", &ln_forward_op);
  m.impl("ln_backward", &ln_backward_op);
}

}  // namespace fastrnn
