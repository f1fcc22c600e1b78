// The body of every kernels_<isa>.cpp: the table of one instruction set. Before including
// it, the file defines FASTRNN_CPU_ISA (its namespace) and kIsa (its tiling, recurrence.h).
#pragma once

#include "fma_peak.h"
#include "kernels.h"
#include "recurrence.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {

template <class T>
void run_forward(CellKind kind, const ForwardParams<T>* p, int ndir, T* const* ws, int threads) {
  forward<kIsa>(kind, p, ndir, ws, threads);
}

template <class T>
void run_backward(CellKind kind, const BackwardParams<T>* p, int ndir, T* const* ws,
                  int threads) {
  backward<kIsa>(kind, p, ndir, ws, threads);
}

template <class T>
void run_gemm(const GemmArgs<T>& g, int threads) {
  parallel_gemm_fit<typename kIsa::template Gemm<T>>(g.M, g.N, g.K, g.a, g.ars, g.aks, g.b, g.bk,
                                                 g.bn, g.beta, g.bias, g.c, g.ldc, threads);
}

template <class T>
void run_column_sum(const T* t, int64_t R, int64_t C, int64_t rs, int64_t cs, T* out,
                    int threads, const T* u, int64_t us, T* out_u) {
  column_sum<typename kIsa::template V<T>>(t, R, C, rs, cs, out, threads, u, us, out_u);
}

template <class T>
double run_fma_peak(int threads, double seconds) {
  return fma_peak<T, kIsa::template kLanes<T>, kIsa::kAccRegs>(threads, seconds);
}

bool run_bf16_step_wide() {
#ifdef FASTRNN_CPU_BF16
  return bf16_step_wide();
#else
  return false;
#endif
}

bool run_bf16_step_amx() {
#ifdef FASTRNN_CPU_BF16
  return amx_usable();
#else
  return false;
#endif
}

#define FASTRNN_STR2(x) #x
#define FASTRNN_STR(x) FASTRNN_STR2(x)
const Kernels& table() {
  static const Kernels k{FASTRNN_STR(FASTRNN_CPU_ISA),
                         &run_forward<float>,  &run_forward<double>,
                         &run_backward<float>, &run_backward<double>,
                         &run_gemm<float>,     &run_gemm<double>,
                         &run_column_sum<float>, &run_column_sum<double>,
                         &run_fma_peak<float>, &run_fma_peak<double>,
                         &run_bf16_step_wide,  &run_bf16_step_amx};
  return k;
}
#undef FASTRNN_STR
#undef FASTRNN_STR2

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn
