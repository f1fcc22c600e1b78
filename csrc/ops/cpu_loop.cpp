// CPU backend: the OpenMP recurrence driver with ATen's CPU BLAS as its GEMM.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <type_traits>
#include <vector>

#include "../kernels/cpu/recurrence.h"
#include "rnn_op.h"

namespace fastrnn {
namespace {

// The BLAS linked into libtorch exports the standard Fortran entry points (MKL on x86
// wheels, OpenBLAS elsewhere) and, with MKL, the packed-GEMM and thread-local controls;
// ATen's own cpublas::gemm is not exported. All weak, so a torch without them still loads
// and the calls fall back to the next best: plain BLAS, then at::mm.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
// MKL's CBLAS enums are plain ints: RowMajor 101, NoTrans 111, Trans 112, Packed 151,
// BMatrix 162.
size_t cblas_sgemm_pack_get_size(int, int, int, int) __attribute__((weak));
void cblas_sgemm_pack(int, int, int, int, int, int, float, const float*, int, float*)
    __attribute__((weak));
void cblas_sgemm_compute(int, int, int, int, int, int, const float*, int, const float*, int,
                         float, float*, int) __attribute__((weak));
// The C entry point; the lower-case name is the Fortran one (argument by pointer).
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

template <class T> struct Blas;
template <> struct Blas<float> { static constexpr auto gemm = &sgemm_; };
template <> struct Blas<double> { static constexpr auto gemm = &dgemm_; };

// A fixed weight op(W) [K, N]: MKL's packed copy when available (float), else the
// original pointer.
template <class T>
struct PackedWeight {
  const T* w = nullptr;
  int64_t ldw = 0, K = 0, N = 0;
  bool trans = false;
  std::unique_ptr<float[]> packed;  // MKL packed format (float only); MKL asks for several
                                    // MB whatever the size, so it is left uninitialised
};

// Row-major GEMM on column-major BLAS: C = A op(W) is computed as C^T = op(W)^T A^T.
template <class T>
struct CpuGemm {
  struct SingleThreaded {
    int prev = 0;
    SingleThreaded() {
      if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
    }
    ~SingleThreaded() {
      if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);  // 0 restores global
    }
  };
  std::unique_ptr<SingleThreaded> single_threaded() const {
    return std::make_unique<SingleThreaded>();
  }

  PackedWeight<T> pack(const T* w, int64_t ldw, bool trans, int64_t K, int64_t N,
                       int64_t M) const {
    PackedWeight<T> p{w, ldw, K, N, trans, nullptr};
    if constexpr (std::is_same_v<T, float>) {
      if (w && N > 0 && K > 0 && M > 0 && cblas_sgemm_pack && cblas_sgemm_compute) {
        const size_t bytes = cblas_sgemm_pack_get_size(162, M, N, K);
        p.packed.reset(new float[(bytes + sizeof(float) - 1) / sizeof(float)]);
        cblas_sgemm_pack(101, 162, trans ? 112 : 111, M, N, K, 1.0f, w, ldw, p.packed.get());
      }
    }
    return p;
  }

  void run(const PackedWeight<T>& W, int64_t M, const T* A, int64_t lda, T beta, T* C,
           int64_t ldc) const {
    const int64_t N = W.N, K = W.K;
    if constexpr (std::is_same_v<T, float>) {
      if (W.packed) {
        cblas_sgemm_compute(101, 111, 151, M, N, K, A, lda, W.packed.get(), N, beta, C, ldc);
        return;
      }
    }
    if (Blas<T>::gemm) {
      const char opw = W.trans ? 'T' : 'N', opa = 'N';
      const int m = N, n = M, k = K, lw = W.ldw, la = lda, lc = ldc;
      const T one = 1;
      Blas<T>::gemm(&opw, &opa, &m, &n, &k, &one, W.w, &lw, A, &la, &beta, C, &lc);
      return;
    }
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
    at::Tensor w = at::from_blob(const_cast<T*>(W.w), {W.trans ? N : K, W.trans ? K : N},
                                 {W.ldw, 1}, opts);
    at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
    if (beta == T(0)) c.zero_();  // BLAS semantics: C is not read when beta == 0
    at::addmm_out(c, c, a, W.trans ? w.t() : w, beta, 1);
  }
};

}  // namespace

void cpu_forward_loop(const LoopTensors& a) {
  AT_DISPATCH_FLOATING_TYPES(a.y.scalar_type(), "fastrnn_cpu_forward", [&] {
    ForwardParams<scalar_t> p[2];
    scalar_t* ws[2];
    for (int d = 0; d < a.s.D; ++d) p[d] = forward_params<scalar_t>(a, d);
    const int threads = at::get_num_threads();
    const int64_t n = cpu::forward_workspace(p[0], a.s.G, threads);
    at::Tensor work = at::empty({a.s.D * n}, a.y.options());
    for (int d = 0; d < a.s.D; ++d) ws[d] = work.mutable_data_ptr<scalar_t>() + d * n;
    cpu::forward(a.s.kind, p, a.s.D, CpuGemm<scalar_t>{}, ws, threads);
  });
}

void cpu_backward_loop(const LoopTensors& a) {
  AT_DISPATCH_FLOATING_TYPES(a.dh0.scalar_type(), "fastrnn_cpu_backward", [&] {
    BackwardParams<scalar_t> p[2];
    scalar_t* ws[2];
    for (int d = 0; d < a.s.D; ++d) p[d] = backward_params<scalar_t>(a, d);
    const int threads = at::get_num_threads();
    const int64_t n = cpu::backward_workspace(p[0], a.s.G, threads);
    at::Tensor work = at::empty({a.s.D * n}, a.dh0.options());
    for (int d = 0; d < a.s.D; ++d) ws[d] = work.mutable_data_ptr<scalar_t>() + d * n;
    cpu::backward(a.s.kind, p, a.s.D, CpuGemm<scalar_t>{}, ws, threads);
  });
}

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("forward", &forward_op);
  m.impl("backward", &backward_op);
}

}  // namespace fastrnn
