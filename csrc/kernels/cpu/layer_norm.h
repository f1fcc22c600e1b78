// Row statistics of the LayerNorm cells (cells.h: LnLstm, LnGru), from blocks of 16 units,
// the granularity of the recurrence's thread split (recurrence.h: split). Each thread
// computes the parts of its own blocks; every thread then combines all the parts of a row
// in block order, so a row's statistics are the same bits whatever the thread split.
// A row v holds G values per unit: value g of unit j at v[g * H + j]. Torch-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {

constexpr int64_t kNormBlock = 16;  // units per block

inline int64_t norm_blocks(int64_t H) { return (H + kNormBlock - 1) / kNormBlock; }

// Blocks of units [j0, j1) (j0 a multiple of kNormBlock, j1 one too or H).
inline int64_t first_block(int64_t j0) { return j0 / kNormBlock; }
inline int64_t end_block(int64_t j1) { return norm_blocks(j1); }

// body(j, load, store) for j = j0, j0 + L, ... < j1, L = V::kLanes: load(q) reads the
// vector of units [j, min(j + L, j1)) at q, store(v, q) writes it (the last one partial).
template <class V, class T, class Body>
FASTRNN_INLINE void for_vectors(int64_t j0, int64_t j1, Body&& body) {
  constexpr int L = V::kLanes;
  for (int64_t j = j0; j < j1; j += L) {
    const int m = static_cast<int>(std::min<int64_t>(L, j1 - j));
    const bool full = m == L;
    body(j, [full, m](const T* q) { return full ? V::load(q) : V::load(q, m); },
         [full, m](V v, T* q) { full ? v.store(q) : v.store(q, m); });
  }
}

// Sum of a vector's lanes, in lane order.
template <class V>
FASTRNN_INLINE auto lane_sum(V v) {
  decltype(v.v[0] + 0) s = v.v[0];
  for (int l = 1; l < V::kLanes; ++l) s += v.v[l];
  return s;
}

// out = (mean, sum of squared deviations from it) of the G x (units of block k) values of v.
// A whole block runs on vectors of L lanes (L divides kNormBlock), a last short one on
// scalars.
template <class V, class T>
void block_moments(const T* v, int64_t H, int G, int64_t k, T* out) {
  constexpr int L = V::kLanes;
  const int64_t j0 = k * kNormBlock, j1 = std::min(H, j0 + kNormBlock);
  T mean, m2;
  if (j1 - j0 == kNormBlock) {
    V acc(T(0));
    for (int g = 0; g < G; ++g)
      for (int64_t j = j0; j < j1; j += L) acc += V::load(v + g * H + j);
    mean = lane_sum(acc) / static_cast<T>(G * kNormBlock);
    V sq(T(0));
    for (int g = 0; g < G; ++g)
      for (int64_t j = j0; j < j1; j += L) {
        const V d = V::load(v + g * H + j) - V(mean);
        sq += d * d;
      }
    m2 = lane_sum(sq);
  } else {
    T sum = 0;
    for (int g = 0; g < G; ++g)
      for (int64_t j = j0; j < j1; ++j) sum += v[g * H + j];
    mean = sum / static_cast<T>(G * (j1 - j0));
    m2 = 0;
    for (int g = 0; g < G; ++g)
      for (int64_t j = j0; j < j1; ++j) {
        const T d = v[g * H + j] - mean;
        m2 += d * d;
      }
  }
  out[0] = mean;
  out[1] = m2;
}

// Mean and 1 / sqrt(variance + eps) (biased variance, as torch's layer_norm) of a row of
// G x H values from its blocks' moments, part [norm_blocks(H), 2], merged in block order
// by the pairwise update of Chan et al.
template <class T>
void row_moments(const T* part, int64_t H, int G, T eps, T& mean, T& rstd) {
  T n = 0, m = 0, m2 = 0;
  for (int64_t k = 0; k < norm_blocks(H); ++k) {
    const T nk = static_cast<T>(G * (std::min(H, (k + 1) * kNormBlock) - k * kNormBlock));
    const T tot = n + nk, d = part[2 * k] - m;
    m += d * (nk / tot);
    m2 += part[2 * k + 1] + d * d * (n * nk / tot);
    n = tot;
  }
  mean = m;
  rstd = T(1) / std::sqrt(m2 / n + eps);
}

// The backward's sums over block k: out = (sum of w * dy, sum of w * dy * a), dy the
// gradient w.r.t. the LayerNorm's output w * a + b and a the normalised values, all rows
// laid out as v above; vectors as in block_moments.
template <class V, class T>
void block_sums(const T* dy, const T* a, const T* w, int64_t H, int G, int64_t k, T* out) {
  constexpr int L = V::kLanes;
  const int64_t j0 = k * kNormBlock, j1 = std::min(H, j0 + kNormBlock);
  if (j1 - j0 == kNormBlock) {
    V s0(T(0)), s1(T(0));
    for (int g = 0; g < G; ++g)
      for (int64_t j = g * H + j0; j < g * H + j1; j += L) {
        const V wd = V::load(w + j) * V::load(dy + j);
        s0 += wd;
        s1 += wd * V::load(a + j);
      }
    out[0] = lane_sum(s0);
    out[1] = lane_sum(s1);
    return;
  }
  T s0 = 0, s1 = 0;
  for (int g = 0; g < G; ++g)
    for (int64_t j = g * H + j0; j < g * H + j1; ++j) {
      const T wd = w[j] * dy[j];
      s0 += wd;
      s1 += wd * a[j];
    }
  out[0] = s0;
  out[1] = s1;
}

// The row's two sums, divided by its G * H values (the means the backward needs), from
// part [norm_blocks(H), 2] added in block order.
template <class T>
void row_means(const T* part, int64_t H, int G, T& mean0, T& mean1) {
  T s0 = 0, s1 = 0;
  for (int64_t k = 0; k < norm_blocks(H); ++k) {
    s0 += part[2 * k];
    s1 += part[2 * k + 1];
  }
  mean0 = s0 / static_cast<T>(G * H);
  mean1 = s1 / static_cast<T>(G * H);
}

// d(input) of a LayerNorm from d(normalised) = w * dy: rstd * (w dy - mean0 - a mean1).
template <class T>
FASTRNN_INLINE T norm_input_grad(T w_dy, T a, T rstd, T mean0, T mean1) {
  return rstd * (w_dy - mean0 - a * mean1);
}

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn
