// CPU backend: the OpenMP recurrence driver with ATen's CPU BLAS as its GEMM.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/cpu/recurrence.h"
#include "rnn_op.h"

namespace fastrnn {
namespace {

// The BLAS linked into libtorch (MKL on x86 wheels, OpenBLAS elsewhere) exports the
// standard Fortran entry points; cpublas::gemm itself is not exported. Weak, so a torch
// without them still loads and falls back to at::mm.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

template <class T> struct Blas;
template <> struct Blas<float> { static constexpr auto gemm = &sgemm_; };
template <> struct Blas<double> { static constexpr auto gemm = &dgemm_; };

// Row-major GEMM on column-major BLAS: C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T.
// Called from inside the OpenMP team, where the BLAS runs single-threaded.
template <class T>
struct CpuGemm {
  void operator()(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                  int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) const {
    if (Blas<T>::gemm) {
      const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
      const int m = N, n = M, k = K, la = lda, lb = ldb, lc = ldc;
      Blas<T>::gemm(&opb, &opa, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
      return;
    }
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor a = at::from_blob(const_cast<T*>(A), {ta ? K : M, ta ? M : K}, {lda, 1}, opts);
    at::Tensor b = at::from_blob(const_cast<T*>(B), {tb ? N : K, tb ? K : N}, {ldb, 1}, opts);
    at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
    if (ta) a = a.t();
    if (tb) b = b.t();
    if (beta == T(0)) c.zero_();  // BLAS semantics: C is not read when beta == 0
    at::addmm_out(c, c, a, b, beta, alpha);
  }
};

}  // namespace

void cpu_forward_loop(const LoopTensors& a) {
  AT_DISPATCH_FLOATING_TYPES(a.y.scalar_type(), "fastrnn_cpu_forward", [&] {
    const ForwardParams<scalar_t> p = forward_params<scalar_t>(a);
    at::Tensor ws = at::empty({cpu::forward_workspace(p, a.s.G)}, a.y.options());
    cpu::forward(a.s.kind, p, CpuGemm<scalar_t>{}, ws.mutable_data_ptr<scalar_t>(),
                 at::get_num_threads());
  });
}

void cpu_backward_loop(const LoopTensors& a) {
  AT_DISPATCH_FLOATING_TYPES(a.dh.scalar_type(), "fastrnn_cpu_backward", [&] {
    const BackwardParams<scalar_t> p = backward_params<scalar_t>(a);
    at::Tensor ws = at::empty({cpu::backward_workspace(p)}, a.dh.options());
    cpu::backward(a.s.kind, p, CpuGemm<scalar_t>{}, ws.mutable_data_ptr<scalar_t>(),
                  at::get_num_threads());
  });
}

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("forward", &forward_op);
  m.impl("backward", &backward_op);
}

}  // namespace fastrnn
