// The measured multiply-add limit of one instruction set (torch-free). CPUID gives the
// vector width, but not how many FMA pipes a core has, whether it splits a 512-bit FMA in
// two (AMD Zen 4 does: the same flops per cycle as AVX2), nor the clock it runs at (a VM
// reports a nominal one), so the benchmarks measure the limit they compare against.
#pragma once

#include <omp.h>

#include <cstdint>

#include "simd.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {

// GFLOP/s of `Chains` independent chains of L-lane FMAs (enough to cover FMA latency times
// pipes, few enough to stay in registers) on each of `threads` threads, run for about
// `seconds`, summed over the threads.
template <class T, int L, int Chains>
double fma_peak(int threads, double seconds) {
  using V = Vec<T, L>;
  double gflops = 0;
#pragma omp parallel num_threads(threads) reduction(+ : gflops)
  {
    V acc[Chains];
    for (int i = 0; i < Chains; ++i) acc[i] = V(T(i + 1) * T(1e-3));
    const V a(T(0.999999)), b(T(1e-7));
    int64_t iters = 0;
    const double t0 = omp_get_wtime();
    double t = t0;
    do {
      for (int n = 0; n < 4096; ++n) {
#pragma GCC unroll 32
        for (int i = 0; i < Chains; ++i) acc[i] = acc[i] * a + b;
      }
      // The chains' values must exist here (the compiler dropped unused ones altogether).
      for (int i = 0; i < Chains; ++i) asm volatile("" : "+m"(acc[i]));
      iters += 4096;
      t = omp_get_wtime();
    } while (t - t0 < seconds);
    gflops += 2.0 * L * Chains * static_cast<double>(iters) / (t - t0) * 1e-9;
  }
  return gflops;
}

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn
