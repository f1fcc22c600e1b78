// bfloat16 products for the recurrent step of a float32 layer (AVX512_BF16's vdpbf16ps):
// W_hh and the h fed to it are rounded to bfloat16 once, each product pair is summed in
// float32. Half the bytes of a float32 W_hh to stream every step, which is what bounds a
// small batch's step. Only in the AVX-512 kernels (FASTRNN_CPU_BF16), and only called on a
// CPU with the avx512_bf16 flag, for a W_hh of 512 KiB or more in float32 (recurrence.h).
// A larger batch's step is bound by multiply-adds instead, so it takes bf16 products only
// where vdpbf16ps does more of them per cycle than float32 FMAs, which this CPU's own rates
// decide (bf16_step_wide): twice as many on AMD Zen 4 (LSTM B=16..64 step 1.3-1.5x faster),
// no more on Intel cores with AMX (there 30% slower at B=16..64).
//
// Layout: a vector of 32 bfloat16 holds, in 32-bit lane l, the pair (k, k + 1) of column l,
// so one vdpbf16ps adds a[k] * b[k][l] + a[k+1] * b[k+1][l] to lane l. A row of values
// converted to bfloat16 in order is already a run of such pairs (little-endian: k in the low
// half); rows of odd length end with a zero.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "fma_peak.h"
#include "gemm.h"
#include "kernels.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {

// Whether this CPU has AVX512_BF16 (its CPUID flags, read once).
inline bool has_bf16_dot() {
  static const bool on = cpu_has("avx512_bf16");
  return on;
}

// Bits of bf16(x), rounded to nearest even; a NaN stays a (quiet) NaN.
FASTRNN_INLINE uint32_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;
}

// Values [k0, k1) of src (k0 even) as pairs: out[k / 2] for k = k0, k0 + 2, ...; a value at
// or past n (the row's length) is zero. Pairs are int32_t, the lane type of Vec<int32_t>.
// 16 values at a time, bf16_bits' rounding on integer lanes (the same bits).
FASTRNN_INLINE void to_bf16_pairs(const float* src, int64_t k0, int64_t k1, int64_t n,
                                  int32_t* out) {
  using U = uint32_t __attribute__((vector_size(64)));  // 16 lanes of float bits
  using U16 = uint16_t __attribute__((vector_size(32)));
  int64_t k = k0;
  for (; k + 16 <= std::min(k1, n); k += 16) {
    U u;
    std::memcpy(&u, src + k, sizeof(u));
    const U high = u >> 16, rounded = (u + 0x7fffu + (high & 1u)) >> 16;
    const U nan = (U)((u & 0x7fffffffu) > 0x7f800000u);  // all ones where NaN
    const U bits = (nan & (high | 0x40u)) | (~nan & rounded);
    const U16 halves = __builtin_convertvector(bits, U16);  // 16 values: 8 pairs
    std::memcpy(out + k / 2, &halves, sizeof(halves));
  }
  for (; k + 1 < k1 && k + 1 < n; k += 2)
    out[k / 2] = static_cast<int32_t>(bf16_bits(src[k]) | bf16_bits(src[k + 1]) << 16);
  for (; k < k1; k += 2) out[k / 2] = k < n ? static_cast<int32_t>(bf16_bits(src[k])) : 0;
}

// Columns [c0, c0 + nc) of w [K, ld] (value (k, c) at w[k * ld + c]) as pairs along k, in
// panels of W columns: panel u is [K2][W] (K2 = bf16_pairs(K)) holding the pair
// (w[2i][c], w[2i + 1][c]) at (i, c - c0 - u * W); zero past nc and past K.
// out: [ceil(nc / W)][K2][W].
inline void pack_columns_bf16(const float* w, int64_t K, int64_t ld, int64_t c0, int64_t nc,
                              int64_t W, int32_t* out) {
  const int64_t K2 = bf16_pairs(K);
  for (int64_t u = 0; u * W < nc; ++u)
    for (int64_t i = 0; i < K2; ++i) {
      int32_t* o = out + (u * K2 + i) * W;
      if (2 * i >= K) {  // padding
        std::fill(o, o + W, 0);
        continue;
      }
      const float* r0 = w + 2 * i * ld + c0 + u * W;
      for (int64_t c = 0; c < W; ++c) {
        const bool in = u * W + c < nc;
        const uint32_t lo = in ? bf16_bits(r0[c]) : 0;
        const uint32_t hi = in && 2 * i + 1 < K ? bf16_bits(r0[ld + c]) : 0;
        o[c] = static_cast<int32_t>(lo | hi << 16);
      }
    }
}

// W_hh rows of units [j0, j0 + hs) as pairs, laid out as pack_gates lays out float32 with
// pairs for values: block u is a panel [K2][NB][G][L] of pairs (K2 = bf16_pairs(P)), unit
// j = j0 + (u*NB + b)*L + l, zero past hs. VI: the int32_t vector of L lanes.
// w_hh: [G*H, P]; out: [ceil(hs / (NB*L))][K2][NB][G][L].
template <int G, int NB, class VI>
void pack_gates_bf16(const float* w_hh, int64_t H, int64_t P, int64_t j0, int64_t hs,
                     int32_t* out) {
  constexpr int L = VI::kLanes, W = NB * G * L;
  const int64_t K2 = bf16_pairs(P);
  std::unique_ptr<int32_t[]> rows(new int32_t[L * K2]);  // L rows of pairs
  for (int64_t u = 0; u * NB * L < hs; ++u)
    for (int b = 0; b < NB; ++b)
      for (int g = 0; g < G; ++g) {
        const int64_t j = (u * NB + b) * L, n = std::clamp<int64_t>(hs - j, 0, L);
        for (int64_t l = 0; l < n; ++l)
          to_bf16_pairs(w_hh + (g * H + j0 + j + l) * P, 0, 2 * K2, P, rows.get() + l * K2);
        transpose_pack<VI>(rows.get(), K2, n, K2, out + u * K2 * W + (b * G + g) * L, W);
      }
}

// acc[r][v] += sum over k of a[r, k] * panel[k][v*16 .. v*16 + 16), with a's pairs at
// a[r * ars + k2] and the panel [K2][NV * 16] pairs (K2 = pairs per row). Out of line: its
// instruction set is the CPU's, not the whole file's; the accumulators pass through
// memory once per tile, against K2 iterations of MR * NV products.
template <int MR, int NV, class V>
__attribute__((target("avx512bf16"), noinline)) void tile_acc_bf16(int64_t K2, const int32_t* a,
                                                                   int64_t ars,
                                                                   const int32_t* panel,
                                                                   V (&acc)[MR][NV]) {
  constexpr int W = NV * 16;
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) c[r][v] = acc[r][v].v;
  for (int64_t k = 0; k < K2; ++k, panel += W, ++a) {
    if constexpr (MR > 2) {
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) __builtin_prefetch(panel + 16 * W + v * 16);
    }
    __m512bh b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(panel + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(a[r * ars]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], ar, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v].v = c[r][v];
}

// out[i, c] (+)= sum over k of a[i, k] * b[k, c] for rows [0, n), columns [0, nc): a as
// pairs [n, K2] (row stride K2), b as pack_columns_bf16's panels of NV * 16 columns
// ([ceil(nc / (NV * 16))][K2][NV * 16] pairs), out [n, ldo]; beta 0 (write) or 1 (add).
// Only the first `pairs` (<= K2) pairs of a row are summed: the rest is bf16_pairs' zero
// padding, which only the AMX tiles need. Each panel streams from L2 through row tiles of
// MR rows.
template <int MR, int NV, class V>
void recurrent_bf16(const int32_t* panels, int64_t K2, int64_t pairs, int64_t nc,
                    const int32_t* a, int64_t n, float beta, float* out, int64_t ldo) {
  constexpr int W = NV * 16;
  for (int64_t c0 = 0; c0 < nc; c0 += W) {
    const int32_t* panel = panels + c0 * K2;  // panel c0 / W
    auto tile = [&](int64_t i0, auto rows) {
      constexpr int R = decltype(rows)::value;
      V acc[R][NV];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[r][v] = V(0.f);
      tile_acc_bf16<R, NV>(pairs, a + i0 * K2, K2, panel, acc);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) {
          const int64_t c = c0 + v * 16;
          const int m = static_cast<int>(std::min<int64_t>(16, nc - c));
          if (m <= 0) break;
          float* o = out + (i0 + r) * ldo + c;
          if (m == 16)
            (beta != 0 ? acc[r][v] + V::load(o) : acc[r][v]).store(o);
          else
            (beta != 0 ? acc[r][v] + V::load(o, m) : acc[r][v]).store(o, m);
        }
    };
    int64_t i0 = 0;
    for (; i0 + MR <= n; i0 += MR) tile(i0, std::integral_constant<int, MR>{});
    with_rows<MR - 1>(n - i0, [&](auto rows) { tile(i0, rows); });
  }
}

// GFLOP/s of vdpbf16ps on one thread (2 flops per bf16 pair product), as fma_peak measures
// float32 FMAs: independent chains in registers for about `seconds`. (Its own timed loop:
// code passed into a shared one would not inherit the avx512bf16 target.)
__attribute__((target("avx512bf16"), noinline)) inline double bf16_dot_peak(double seconds) {
  constexpr int kChains = 24;
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1e-3f * static_cast<float>(i + 1));
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.999f), _mm512_set1_ps(0.998f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
  int64_t iters = 0;
  const double t0 = omp_get_wtime();
  double t = t0;
  do {
    for (int n = 0; n < 1024; ++n) {
#pragma GCC unroll 32
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    }
    for (int i = 0; i < kChains; ++i) asm volatile("" : "+m"(acc[i]));
    iters += 1024;
    t = omp_get_wtime();
  } while (t - t0 < seconds);
  return 2.0 * 32 * kChains * static_cast<double>(iters) / (t - t0) * 1e-9;
}

// Whether the bf16 step also pays for batches past the narrow tiles: vdpbf16ps does at least
// 1.5 times the multiply-adds per second of float32 FMAs on this CPU (measured once, about
// 40 ms, at the first bf16 step of the process; the better of two tries of each).
inline bool bf16_step_wide() {
  static const bool on = [] {
    if (!has_bf16_dot()) return false;
    double bf16 = 0, fp32 = 0;
    for (int i = 0; i < 2; ++i) {
      bf16 = std::max(bf16, bf16_dot_peak(0.01));
      fp32 = std::max(fp32, fma_peak<float, 16, 24>(1, 0.01));
    }
    return bf16 >= 1.5 * fp32;
  }();
  return on;
}

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn
