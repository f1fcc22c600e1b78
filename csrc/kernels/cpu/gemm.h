// Register-tiled GEMM for the CPU kernels (torch-free), on the Vec type of simd.h.
//
// B is packed once into panels of W = NV vectors (NV * L columns): panel p holds columns
// [p*W, p*W + W) of op(B) as [K][W], zero past N, so the tile streams it with unit stride.
// The tile broadcasts A[r, k] from any row/column stride: a row-major A (x [M, K], h) is
// read where it lies; a transposed view (dgx^T in the weight gradients) is copied per K
// block into [K][MR] tiles first (Gemm::run), so its MR values of one k share a line.
// The tile keeps MR x NV accumulators in registers for the whole K loop.
//
// Determinism: every C element is one chain of FMAs over k = 0..K-1 in order, whatever
// the tiling, the K blocking (a block continues the chain from C) or the thread split
// (only rows and panels are split, never K). So any thread count gives the same bits.
// The one exception, a product x W^T of at most kRowDotRows rows (row_dots, which reads W
// unpacked), sums each element in lanes, in an order fixed by K alone: again the same bits
// for any thread count.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "simd.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {

// Pads allocations so the packed panels start on a cache line.
template <class T>
struct Buffer {
  std::unique_ptr<T[]> mem;
  T* data = nullptr;
  int64_t capacity = 0;
  void resize(int64_t n) {
    mem.reset(new T[n + 64 / sizeof(T)]);
    const auto addr = reinterpret_cast<uintptr_t>(mem.get());
    data = mem.get() + ((64 - addr % 64) % 64) / sizeof(T);
    capacity = n;
  }
  void reserve(int64_t n) {  // keeps the memory when it is large enough
    if (n > capacity) resize(n);
  }
};

// Panels of op(B) [K, N]: element (k, n) of op(B) is b[k * bk + n * bn].
template <class T>
struct Panels {
  const T* data = nullptr;  // [count][K][width]
  int64_t K = 0, N = 0, width = 0;
  int64_t count() const { return (N + width - 1) / width; }
  const T* panel(int64_t p) const { return data + p * K * width; }
};

// dst[k * ldd + l] = src[l * ld + k] for k < K, l < L (L = V::kLanes): `rows` rows of src
// (rows <= L) become one L-wide column block of dst, zero in lanes [rows, L). Full blocks
// go through L x L register transposes; the edges are copied one value at a time.
template <class V, class T>
void transpose_pack(const T* src, int64_t ld, int64_t rows, int64_t K, T* dst, int64_t ldd) {
  constexpr int L = V::kLanes;
  int64_t k = 0;
  if (rows == L) {
    for (; k + L <= K; k += L) {
      V v[L];
#pragma GCC unroll 16
      for (int r = 0; r < L; ++r) v[r] = V::load(src + r * ld + k);
      transpose(v);
#pragma GCC unroll 16
      for (int r = 0; r < L; ++r) v[r].store(dst + (k + r) * ldd);
    }
  }
  for (; k < K; ++k)
    for (int l = 0; l < L; ++l) dst[k * ldd + l] = l < rows ? src[l * ld + k] : T(0);
}

// Packs panels [p0, p1) of op(B) into out (laid out as a whole Panels of `width`, a
// multiple of V's lanes). A B read along k (bk == 1, e.g. W^T of a row-major W) is
// transposed L columns at a time; otherwise rows of B are copied along n.
template <class V, class T>
void pack_panels(const T* b, int64_t bk, int64_t bn, int64_t K, int64_t N, int64_t width,
                 int64_t p0, int64_t p1, T* out) {
  constexpr int L = V::kLanes;
  for (int64_t p = p0; p < p1; ++p) {
    T* dst = out + p * K * width;
    const int64_t n0 = p * width, nw = std::min(width, N - n0);
    if (bk == 1 && bn != 1) {
      for (int64_t j = 0; j < width; j += L)
        transpose_pack<V>(b + (n0 + j) * bn, bn, std::clamp<int64_t>(nw - j, 0, L), K, dst + j,
                          width);
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      T* row = dst + k * width;
      if (bn == 1) {
        std::copy_n(b + k * bk + n0, nw, row);
      } else {
        for (int64_t j = 0; j < nw; ++j) row[j] = b[k * bk + (n0 + j) * bn];
      }
      std::fill(row + nw, row + width, T(0));
    }
  }
}

// acc[r][v] += sum_{k < K} A[r, k] * panel[k][v*L .. v*L + L), with A[r, k] at
// a[r * ars + k * aks] and the panel [K][NV * L].
template <int MR, int NV, class V, class T>
FASTRNN_INLINE void tile_acc(int64_t K, const T* a, int64_t ars, int64_t aks, const T* panel,
                             V (&acc)[MR][NV]) {
  constexpr int L = V::kLanes, W = NV * L;
  for (int64_t k = 0; k < K; ++k, panel += W, a += aks) {
    // The panel streams from L2: ask for its lines a few k ahead. (With one or two rows
    // the loads outnumber the FMAs and the hardware prefetcher keeps up on its own.)
    if constexpr (MR > 2) {
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) __builtin_prefetch(panel + 8 * W + v * L);
    }
    V b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = V::load(panel + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V ar(a[r * ars]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = ar * b[v] + acc[r][v];
    }
  }
}

// One MR x W block of C = A op(B) (+ C when accumulate), columns [0, n) of the panel
// stored (n <= W), plus bias[0, n) when given.
template <int MR, int NV, class V, class T>
FASTRNN_INLINE void tile_store(int64_t K, const T* a, int64_t ars, int64_t aks, const T* panel,
                               bool accumulate, const T* bias, T* c, int64_t ldc, int64_t n) {
  constexpr int L = V::kLanes;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int64_t m = std::min<int64_t>(L, n - v * L);
      acc[r][v] = !accumulate ? V(T(0))
                  : m >= L   ? V::load(c + r * ldc + v * L)
                  : m > 0    ? V::load(c + r * ldc + v * L, static_cast<int>(m))
                             : V(T(0));
    }
  tile_acc<MR, NV>(K, a, ars, aks, panel, acc);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int64_t m = std::min<int64_t>(L, n - v * L);
      if (m <= 0) continue;
      V out = acc[r][v];
      if (bias) out += m >= L ? V::load(bias + v * L) : V::load(bias + v * L, static_cast<int>(m));
      if (m >= L)
        out.store(c + r * ldc + v * L);
      else
        out.store(c + r * ldc + v * L, static_cast<int>(m));
    }
}

// Calls f(std::integral_constant<int, R>) for R == left, 0 < left <= MaxR: a tile of
// fewer rows than the loop's largest gets its own fully unrolled instantiation.
template <int MaxR, class F>
FASTRNN_INLINE void with_rows(int64_t left, F&& f) {
  if constexpr (MaxR > 0) {
    if (left == MaxR)
      f(std::integral_constant<int, MaxR>{});
    else
      with_rows<MaxR - 1>(left, f);
  }
}

// GEMM tiling of one instruction set: MR rows x NV vectors of accumulators.
//
// Loop order (the broadcast side in L1, the vector side in L2): K blocks of kKc, column
// blocks of about kBlock panels (their K block, kBlock x kKc x W values, stays in L2), row
// tiles of MR rows (the tile's A block, MR x kKc values, stays in L1), then the panels of
// the column block, each streamed from L2 through the tile's accumulators.
template <class T, int L, int MR, int NV>
struct Gemm {
  using V = Vec<T, L>;
  static constexpr int kMR = MR, kNV = NV;
  static constexpr int kWidth = NV * L;  // panel width
  // The same register budget one vector wider (8x3 -> 6x4 on AVX-512): for an N that is a
  // multiple of its width and not of ours (256, 512, ...), no column of the last panel is
  // computed only to be dropped.
  using Wider = Gemm<T, L, std::max(1, MR * NV / (NV + 1)), NV + 1>;
  // One vector wide, with half the accumulators as rows (its A block stays in L1): for N of
  // at most one vector (dx and dW_ih of a layer with a small input), which a wide tile
  // computes mostly as padding (N = 8: 8 of the 48 columns of an AVX-512 8x3 tile).
  using Narrow = Gemm<T, L, std::max(1, MR * NV / 2), 1>;
  static constexpr int64_t kKc = 512;
  static constexpr int64_t kBlock =
      std::max<int64_t>(1, (512 * 1024) / (kKc * kWidth * static_cast<int64_t>(sizeof(T))));

  // C[m, 0:N) (+)= A[m, :] op(B) for rows [0, M) and the columns of panels [p0, p1);
  // A[m, k] at a[m * ars + k * aks]; C row stride ldc.
  static void run(const Panels<T>& B, int64_t p0, int64_t p1, int64_t M, const T* a,
                  int64_t ars, int64_t aks, T beta, const T* bias, T* c, int64_t ldc) {
    const int64_t K = B.K;
    if (K == 0) {  // no products: C = beta C (+ bias)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = p0 * kWidth; j < std::min(B.N, p1 * kWidth); ++j)
          c[m * ldc + j] = (beta != T(0) ? c[m * ldc + j] : T(0)) + (bias ? bias[j] : T(0));
      return;
    }
    // A that is not row-major (a transposed view) is copied, one K block at a time, into
    // tiles [M / MR][kKc][MR], reading it along its unit stride: a tile's MR values of one
    // k then share a cache line, and its K block is contiguous.
    const bool pack_a = aks != 1;
    Buffer<T> a_packed;
    if (pack_a) a_packed.resize(((M + MR - 1) / MR) * MR * std::min(kKc, K));
    const int64_t nblocks = std::max<int64_t>(1, (p1 - p0 + kBlock - 1) / kBlock);
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      const bool acc = k0 > 0 || beta != T(0), last = k0 + kc == K;
      if (pack_a)
        for (int64_t k = 0; k < kc; ++k) {
          // Each k starts a new run of A (often a new page, where the hardware prefetcher
          // stops): ask for the start of a later one now.
          const T* ahead = a + (k0 + std::min(k + 4, kc - 1)) * aks;
          for (int64_t m = 0; m < std::min<int64_t>(M, 64); m += 64 / sizeof(T))
            __builtin_prefetch(ahead + m * ars);
          const T* src = a + (k0 + k) * aks;
          T* dst = a_packed.data + k * MR;  // tile r0 at dst + r0 * kc
          int64_t r0 = 0;
          if (ars == 1)  // whole tiles: one fixed-size copy (a vector move) each
            for (; r0 + MR <= M; r0 += MR) std::memcpy(dst + r0 * kc, src + r0, MR * sizeof(T));
          for (; r0 < M; r0 += MR)
            for (int64_t r = 0; r < std::min<int64_t>(MR, M - r0); ++r)
              dst[r0 * kc + r] = src[(r0 + r) * ars];
        }
      for (int64_t j = 0; j < nblocks; ++j) {
        const int64_t q0 = p0 + (p1 - p0) * j / nblocks, q1 = p0 + (p1 - p0) * (j + 1) / nblocks;
        for (int64_t r0 = 0; r0 < M; r0 += MR) {
          const int64_t rows = std::min<int64_t>(MR, M - r0);
          const T* at = pack_a ? a_packed.data + r0 * kc : a + r0 * ars + k0 * aks;
          const int64_t trs = pack_a ? 1 : ars, tks = pack_a ? MR : aks;
          for (int64_t p = q0; p < q1; ++p) {
            const int64_t n = std::min<int64_t>(kWidth, B.N - p * kWidth);
            const T* panel = B.panel(p) + k0 * kWidth;
            const T* bp = last && bias ? bias + p * kWidth : nullptr;
            T* cp = c + r0 * ldc + p * kWidth;
            if (rows == MR) {
              tile_store<MR, NV, V>(kc, at, trs, tks, panel, acc, bp, cp, ldc, n);
            } else {
              with_rows<MR - 1>(rows, [&](auto r) {
                tile_store<decltype(r)::value, NV, V>(kc, at, trs, tks, panel, acc, bp, cp, ldc,
                                                      n);
              });
            }
          }
        }
      }
    }
  }
};

// out[m * ldo + n] = sum_k a[m * lda + k] * w[n * ldw + k] (+ out when accumulate) (+ bias[n])
// for m < M, n < N: products with a row-major W read where it lies (x W^T, h W_hh^T) for
// few rows of A, where packing W would cost more than the products themselves. a: [M, K]
// (row stride lda), w: [N, K] (row stride ldw), out: [M, N] (row stride ldo), bias: [N] or
// nullptr. Each sum runs in L lanes (lane l takes k = l, l + L, ... in order), then adds
// the lanes in a fixed order, so its bits depend on K alone, never on M, N or a split of
// N. L rows of W at a time: their L lane vectors are transposed and summed into one vector
// of L outputs.
template <class V, class T>
void row_dots(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* w,
              int64_t ldw, bool accumulate, const T* bias, T* out, int64_t ldo) {
  constexpr int L = V::kLanes;
  const int64_t kfull = K / L * L;
  const int ktail = static_cast<int>(K - kfull);
  auto block = [&](int64_t n0, auto full) {
    constexpr bool kFull = decltype(full)::value;
    const int nr = kFull ? L : static_cast<int>(N - n0);
    const T* wb = w + n0 * ldw;
    for (int64_t m = 0; m < M; ++m) {
      const T* am = a + m * lda;
      V acc[L];
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l) acc[l] = V(T(0));
      for (int64_t k = 0; k < kfull; k += L) {
        const V av = V::load(am + k);
#pragma GCC unroll 16
        for (int l = 0; l < L; ++l)
          if (kFull || l < nr) acc[l] = V::load(wb + l * ldw + k) * av + acc[l];
      }
      if (ktail) {
        const V av = V::load(am + kfull, ktail);
        for (int l = 0; l < nr; ++l) acc[l] = V::load(wb + l * ldw + kfull, ktail) * av + acc[l];
      }
      transpose(acc);
      V s = acc[0];
#pragma GCC unroll 16
      for (int l = 1; l < L; ++l) s += acc[l];
      T* o = out + m * ldo + n0;
      if (accumulate) s += kFull ? V::load(o) : V::load(o, nr);
      if (bias) s += kFull ? V::load(bias + n0) : V::load(bias + n0, nr);
      if (kFull)
        s.store(o);
      else
        s.store(o, nr);
    }
  };
  int64_t n0 = 0;
  for (; n0 + L <= N; n0 += L) block(n0, std::true_type{});
  if (n0 < N) block(n0, std::false_type{});
}

// C [M, N] = A B (+ C when beta) (+ bias) for a row-major B read where it lies (B[k, n] at
// b[k * bk + n]), for few rows of A, where packing B would cost more than the products (dx =
// dgates W_ih and dgates W_hh of one step). Tiles of up to 4 rows x NV vectors; each value is
// the same chain of FMAs over k in order as in Gemm::run (zero-filled lanes past N, as its
// panels have), so the bits are those of the packed product. A[m, k] at a[m * ars + k * aks].
template <int NV, class V, class T>
void unpacked_rows(int64_t M, int64_t N, int64_t K, const T* a, int64_t ars, int64_t aks,
                   const T* b, int64_t bk, T beta, const T* bias, T* c, int64_t ldc) {
  constexpr int L = V::kLanes, W = NV * L;
  // Columns [n0, n0 + W) of C (all of them when full), rows [m0, m0 + R), over k in
  // [k0, k0 + kc): the chain starts from C after the first K block (or with beta), and the
  // bias joins after the last.
  auto tile = [&](int64_t k0, int64_t kc, int64_t n0, int64_t m0, auto rows, auto full) {
    constexpr int R = decltype(rows)::value;
    constexpr bool kFull = decltype(full)::value;
    const int64_t n = kFull ? W : N - n0;
    auto lanes = [n](int v) {
      return static_cast<int>(std::clamp<int64_t>(n - v * V::kLanes, 0, V::kLanes));
    };
    auto load = [&](const T* q, int v) {
      return kFull || lanes(v) == L ? V::load(q) : lanes(v) > 0 ? V::load(q, lanes(v)) : V(T(0));
    };
    const bool from_c = k0 > 0 || beta != T(0), last = k0 + kc >= K;
    V acc[R][NV];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        acc[r][v] = from_c ? load(c + (m0 + r) * ldc + n0 + v * L, v) : V(T(0));
    const T* ar = a + m0 * ars;
    for (int64_t k = k0; k < k0 + kc; ++k) {
      // Each k reads new lines of B, a row stride apart: ask for them a few k ahead, as
      // tile_acc does for its panels (with this and the K blocks, reading B in place beats
      // packing it up to 128-256 rows on Zen 4; see kInPlaceRows).
      if (k + 8 < K)
        for (int64_t off = 0; off < n; off += 64 / static_cast<int64_t>(sizeof(T)))
          __builtin_prefetch(b + (k + 8) * bk + n0 + off);
      V bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = load(b + k * bk + n0 + v * L, v);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const V av(ar[r * ars + k * aks]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = av * bv[v] + acc[r][v];
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const int m = lanes(v);
        if (m == 0) continue;
        V out = acc[r][v];
        if (bias && last) out += load(bias + n0 + v * L, v);
        T* q = c + (m0 + r) * ldc + n0 + v * L;
        if (m == L)
          out.store(q);
        else
          out.store(q, m);
      }
  };
  // K blocks as in Gemm::run, so that a column block's K block (kKc x W values) stays in L2
  // while the row tiles pass over it; K == 0 still runs once (C = beta C + bias).
  constexpr int64_t kKc = 512;
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    for (int64_t n0 = 0; n0 < N; n0 += W)
      for (int64_t m0 = 0; m0 < M; m0 += 4)
        with_rows<4>(std::min<int64_t>(4, M - m0), [&](auto rows) {
          if (N - n0 >= W)
            tile(k0, kc, n0, m0, rows, std::true_type{});
          else
            tile(k0, kc, n0, m0, rows, std::false_type{});
        });
  }
}

// Rows of A up to which a product of the form x W^T (A and W both read along k) runs as
// row_dots rather than packing W. Measured on Zen 4, N x K = 768 x 256: M = 1, 4, 8, 16, 32
// took 13, 21, 31, 52, 92 us with row_dots and 41, 28, 36, 52, 82 us packed (AVX-512);
// M = 1, 4, 8 took 13, 20, 28 us against 48, 31, 40 us (AVX2).
constexpr int64_t kRowDotRows = 8;

// Rows of A up to which A B with a row-major B (dx = dgates W_ih, dgates W_hh) reads B in
// place (unpacked_rows, whose software prefetch keeps its strided rows of B coming) rather
// than packing it. Measured on Zen 4, N x K = 512 x 2048, M = 8, 32, 64, 128: 87, 316, 640,
// 1283 us in place against 168, 417, 762, 1441 us packed (AVX-512); 148, 512, 934, 2163 us
// against 282, 628, 778, 1696 us (AVX2, whose tiles hold 8 accumulators). At 256 x 1024
// and 256 x 768 in place is faster up to M = 256 on both. So up to 32 rows, where every
// case measured gains on both instruction sets.
constexpr int64_t kInPlaceRows = 32;

// A large GEMM on `threads` OpenMP threads: C [M, N] = A op(B) (+ bias) (+ C if beta),
// A[m, k] at a[m * ars + k * aks], op(B)[k, n] at b[k * bk + n * bn].
// Threads take row blocks (each with every column) when there are rows enough, else
// column blocks; never a share of K (see the top of this file).
template <class G, class T>
void parallel_gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t ars, int64_t aks,
                   const T* b, int64_t bk, int64_t bn, T beta, const T* bias, T* c, int64_t ldc,
                   int threads) {
  if (M == 0 || N == 0) return;
  using V = typename G::V;
  // A product of few rows reads B unpacked; the threads split N in blocks of `width`
  // columns and each runs f(n0, n1) on its share.
  auto split_columns = [&](int64_t width, auto&& f) {
    const int64_t blocks = (N + width - 1) / width;
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
#pragma omp parallel num_threads(nt) if (nt > 1 && M * N * K > (1 << 17))
    {
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
      const int64_t n0 = blocks * tid / n * width;
      const int64_t n1 = std::min(N, blocks * (tid + 1) / n * width);
      if (n1 > n0) f(n0, n1);
    }
  };
  if (aks == 1 && bk == 1 && bn != 1 && M <= kRowDotRows && K > 0) {  // x W^T, few rows
    split_columns(V::kLanes, [&](int64_t n0, int64_t n1) {
      row_dots<V>(M, n1 - n0, K, a, ars, b + n0 * bn, bn, beta != T(0),
                  bias ? bias + n0 : nullptr, c + n0, ldc);
    });
    return;
  }
  if (bn == 1 && M <= kInPlaceRows) {  // a few rows times a row-major B: B read in place
    split_columns(G::kWidth, [&](int64_t n0, int64_t n1) {
      unpacked_rows<G::kNV, V>(M, n1 - n0, K, a, ars, aks, b + n0, bk, beta,
                               bias ? bias + n0 : nullptr, c + n0, ldc);
    });
    return;
  }
  // The panels of B, kept per calling thread: buffers this large would come back as fresh,
  // OS-zeroed pages on every call.
  thread_local Buffer<T> packed;
  Panels<T> B{nullptr, K, N, G::kWidth};
  const int64_t panels = B.count();
  packed.reserve(std::max<int64_t>(1, panels * K * G::kWidth));
  B.data = packed.data;
  const bool by_rows = M >= 64 * threads;
  // Row blocks of at most about 512 rows, a multiple of the thread count so every thread
  // gets the same share.
  const int64_t tasks = by_rows ? threads * (((M + 511) / 512 + threads - 1) / threads)
                                : std::max<int64_t>(1, std::min<int64_t>(threads, panels));
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  const double work = static_cast<double>(M) * N * std::max<int64_t>(K, 1);
#pragma omp parallel num_threads(nt) if (nt > 1 && work > (1 << 18))
  {
    const int tid = omp_get_thread_num(), n = omp_get_num_threads();
    pack_panels<typename G::V>(b, bk, bn, K, N, G::kWidth, panels * tid / n, panels * (tid + 1) / n,
                const_cast<T*>(B.data));
#pragma omp barrier
    for (int64_t t = tasks * tid / n; t < tasks * (tid + 1) / n; ++t) {
      if (by_rows) {
        const int64_t m0 = M * t / tasks, m1 = M * (t + 1) / tasks;
        G::run(B, 0, panels, m1 - m0, a + m0 * ars, ars, aks, beta, bias, c + m0 * ldc, ldc);
      } else {
        G::run(B, panels * t / tasks, panels * (t + 1) / tasks, M, a, ars, aks, beta, bias, c, ldc);
      }
    }
  }
}

// parallel_gemm with G, G::Wider or, for N of at most one vector, G::Narrow: whichever
// pads N least (G on a tie). Every value is summed in the same order with each of them.
template <class G, class T>
void parallel_gemm_fit(int64_t M, int64_t N, int64_t K, const T* a, int64_t ars, int64_t aks,
                       const T* b, int64_t bk, int64_t bn, T beta, const T* bias, T* c,
                       int64_t ldc, int threads) {
  using W = typename G::Wider;
  using Nw = typename G::Narrow;
  auto padding = [N](int64_t width) { return (N + width - 1) / width * width - N; };
  if (N <= Nw::kWidth && Nw::kWidth < G::kWidth)
    parallel_gemm<Nw>(M, N, K, a, ars, aks, b, bk, bn, beta, bias, c, ldc, threads);
  else if (padding(W::kWidth) < padding(G::kWidth))
    parallel_gemm<W>(M, N, K, a, ars, aks, b, bk, bn, beta, bias, c, ldc, threads);
  else
    parallel_gemm<G>(M, N, K, a, ars, aks, b, bk, bn, beta, bias, c, ldc, threads);
}

// out[c] = sum of t[r * rs + c * cs] and, when u is given, out_u[c] = sum of that times
// u[r * us + c * cs], over rows r = 0..R-1 in order, both in one pass (the bias and
// LayerNorm gradients): threads split the columns, so any thread count gives the same bits.
template <class V, class T>
void column_sum(const T* t, int64_t R, int64_t C, int64_t rs, int64_t cs, T* out, int threads,
                const T* u = nullptr, int64_t us = 0, T* out_u = nullptr) {
  constexpr int L = V::kLanes;
  constexpr int64_t kChunk = 4 * L;  // columns per task: four vector accumulators (each sum)
  const int64_t chunks = (C + kChunk - 1) / kChunk;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, chunks)));
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && R * C > (1 << 16))
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t c0 = q * kChunk, n = std::min(kChunk, C - c0);
    if (cs == 1 && n == kChunk) {
      V acc[4], acc_u[4];
      for (int v = 0; v < 4; ++v) acc[v] = acc_u[v] = V(T(0));
      if (u) {
        for (int64_t r = 0; r < R; ++r)
          for (int v = 0; v < 4; ++v) {
            const V x = V::load(t + r * rs + c0 + v * L);
            acc[v] += x;
            acc_u[v] += x * V::load(u + r * us + c0 + v * L);
          }
      } else {
        for (int64_t r = 0; r < R; ++r)
          for (int v = 0; v < 4; ++v) acc[v] += V::load(t + r * rs + c0 + v * L);
      }
      for (int v = 0; v < 4; ++v) {
        acc[v].store(out + c0 + v * L);
        if (u) acc_u[v].store(out_u + c0 + v * L);
      }
    } else {
      for (int64_t c = c0; c < c0 + n; ++c) {
        T sum = T(0), sum_u = T(0);
        for (int64_t r = 0; r < R; ++r) {
          sum += t[r * rs + c * cs];
          if (u) sum_u += t[r * rs + c * cs] * u[r * us + c * cs];
        }
        out[c] = sum;
        if (u) out_u[c] = sum_u;
      }
    }
  }
}

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn
