// A small SIMD vector type for the CPU kernels, on GCC/Clang vector extensions, so one
// source serves every instruction set: each kernels_<isa>.cpp is compiled with its own
// target flags and picks the lane count (isa.h), and the compiler emits that ISA's
// instructions (zmm with AVX-512, ymm with AVX2, NEON/SSE for the portable build).
//
// Vec<T, N> behaves like a scalar T in arithmetic, so the cell math of cells.h, written
// once for scalars, runs on N units at a time when instantiated with T = Vec<float, N>.
// Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define FASTRNN_INLINE inline __attribute__((always_inline))

// Each instruction set's translation unit defines its own name (kernels_<isa>.cpp); all the
// CPU kernel code lives in that inline namespace, so the copies compiled for different
// instruction sets never share a symbol.
#ifndef FASTRNN_CPU_ISA
#define FASTRNN_CPU_ISA portable
#endif

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {

// The raw vector of Bytes bytes of T (GCC takes vector_size only on a concrete type).
template <class T, int Bytes> struct RawVec;
#define FASTRNN_RAW_VEC(T, Bytes) \
  template <> struct RawVec<T, Bytes> { typedef T type __attribute__((vector_size(Bytes))); };
FASTRNN_RAW_VEC(float, 16) FASTRNN_RAW_VEC(float, 32) FASTRNN_RAW_VEC(float, 64)
FASTRNN_RAW_VEC(double, 16) FASTRNN_RAW_VEC(double, 32) FASTRNN_RAW_VEC(double, 64)
FASTRNN_RAW_VEC(int32_t, 16) FASTRNN_RAW_VEC(int32_t, 32) FASTRNN_RAW_VEC(int32_t, 64)
FASTRNN_RAW_VEC(int64_t, 16) FASTRNN_RAW_VEC(int64_t, 32) FASTRNN_RAW_VEC(int64_t, 64)
FASTRNN_RAW_VEC(uint32_t, 16) FASTRNN_RAW_VEC(uint32_t, 32) FASTRNN_RAW_VEC(uint32_t, 64)
FASTRNN_RAW_VEC(uint16_t, 8) FASTRNN_RAW_VEC(uint16_t, 16) FASTRNN_RAW_VEC(uint16_t, 32)
#undef FASTRNN_RAW_VEC

template <class T, int N>
struct Vec {
  static constexpr int kLanes = N;
  using Raw = typename RawVec<T, sizeof(T) * N>::type;
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  using RawInt = typename RawVec<Int, sizeof(T) * N>::type;
  Raw v;

  FASTRNN_INLINE Vec() = default;
  // Broadcast; implicit, as for a scalar. (Lane by lane: the compiler emits one broadcast,
  // where `Raw{} + s` would add a real +0.0 on the FMA ports.)
  FASTRNN_INLINE Vec(T s) {
    for (int i = 0; i < N; ++i) v[i] = s;
  }
  FASTRNN_INLINE static Vec of(Raw r) {
    Vec out;
    out.v = r;
    return out;
  }

  FASTRNN_INLINE static Vec load(const T* p) {
    Raw r;
    std::memcpy(&r, p, sizeof(r));
    return of(r);
  }
  // The first n (< N) lanes from p, the rest zero; never reads past p[n-1].
  FASTRNN_INLINE static Vec load(const T* p, int n) {
    Vec r(T(0));
    for (int i = 0; i < n && i < N; ++i) r.v[i] = p[i];
    return r;
  }
  FASTRNN_INLINE void store(T* p) const { std::memcpy(p, &v, sizeof(v)); }
  FASTRNN_INLINE void store(T* p, int n) const {
    for (int i = 0; i < n && i < N; ++i) p[i] = v[i];
  }

  FASTRNN_INLINE friend Vec operator+(Vec a, Vec b) { return of(a.v + b.v); }
  FASTRNN_INLINE friend Vec operator-(Vec a, Vec b) { return of(a.v - b.v); }
  FASTRNN_INLINE friend Vec operator*(Vec a, Vec b) { return of(a.v * b.v); }
  FASTRNN_INLINE friend Vec operator/(Vec a, Vec b) { return of(a.v / b.v); }
  FASTRNN_INLINE friend Vec operator-(Vec a) { return of(-a.v); }
  FASTRNN_INLINE Vec& operator+=(Vec b) { v += b.v; return *this; }
};

// In-register transpose of an N x N block held as N vectors (row r in v[r]): stages of
// block width W = N/2 .. 1, each swapping the off-diagonal W x W blocks of every 2W x 2W
// block, N log2 N two-source shuffles in all. Packing transposes weights with it.
// __builtin_shufflevector is GCC 12+ and Clang; older compilers take the lane-by-lane copy.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FASTRNN_HAS_SHUFFLEVECTOR 1
#endif
#endif

#ifdef FASTRNN_HAS_SHUFFLEVECTOR
template <int W, class Raw, size_t... I>
FASTRNN_INLINE Raw shuffle_lo(Raw a, Raw b, std::index_sequence<I...>) {
  constexpr int N = sizeof...(I);
  return __builtin_shufflevector(a, b, ((I / W) % 2 == 0 ? int(I) : int(N + I - W))...);
}
template <int W, class Raw, size_t... I>
FASTRNN_INLINE Raw shuffle_hi(Raw a, Raw b, std::index_sequence<I...>) {
  constexpr int N = sizeof...(I);
  return __builtin_shufflevector(a, b, ((I / W) % 2 == 0 ? int(I + W) : int(N + I))...);
}
#endif

template <int W = 0, class T, int N>
FASTRNN_INLINE void transpose(Vec<T, N> (&v)[N]) {
#ifdef FASTRNN_HAS_SHUFFLEVECTOR
  constexpr int w = W == 0 ? N / 2 : W;
  if constexpr (w >= 1) {
#pragma GCC unroll 16
    for (int r = 0; r < N; ++r) {
      if ((r / w) % 2) continue;
      const auto a = v[r].v, b = v[r + w].v;
      v[r].v = shuffle_lo<w>(a, b, std::make_index_sequence<N>{});
      v[r + w].v = shuffle_hi<w>(a, b, std::make_index_sequence<N>{});
    }
    if constexpr (w > 1) transpose<w / 2>(v);
  }
#else
  Vec<T, N> t[N];
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < N; ++c) t[c].v[r] = v[r].v[c];
  for (int r = 0; r < N; ++r) v[r] = t[r];
#endif
}

// a > b ? x : y, lane by lane.
template <class T, int N>
FASTRNN_INLINE Vec<T, N> select_gt(Vec<T, N> a, Vec<T, N> b, Vec<T, N> x, Vec<T, N> y) {
  return Vec<T, N>::of(a.v > b.v ? x.v : y.v);
}

// min/max that return a when it is NaN (a comparison with NaN is false), so NaNs
// propagate through the clamps and activations as they do in torch.
template <class T, int N>
FASTRNN_INLINE Vec<T, N> vmin(Vec<T, N> a, Vec<T, N> b) { return select_gt(a, b, b, a); }
template <class T, int N>
FASTRNN_INLINE Vec<T, N> vmax(Vec<T, N> a, Vec<T, N> b) { return select_gt(b, a, b, a); }

// Bit-level helpers for float lanes.
template <int N>
FASTRNN_INLINE Vec<float, N> abs_bits(Vec<float, N> x) {
  using V = Vec<float, N>;
  return V::of((typename V::Raw)((typename V::RawInt)x.v & 0x7fffffff));
}
template <int N>
FASTRNN_INLINE Vec<float, N> copysign_bits(Vec<float, N> mag, Vec<float, N> sign) {
  using V = Vec<float, N>;
  using I = typename V::RawInt;
  return V::of((typename V::Raw)(((I)mag.v & 0x7fffffff) | ((I)sign.v & (int32_t)0x80000000)));
}

// Float lanes from n (<= N) bfloat16 values (their bits) at p, the rest zero; bfloat16 is
// the top half of a float32, so each widens exactly.
template <int N>
FASTRNN_INLINE Vec<float, N> load_bf16(const uint16_t* p, int n = N) {
  using V = Vec<float, N>;
  using U16 = typename RawVec<uint16_t, 2 * N>::type;
  using U32 = typename RawVec<uint32_t, 4 * N>::type;
  if (n == N) {
    U16 half;
    std::memcpy(&half, p, sizeof(half));
    return V::of((typename V::Raw)(__builtin_convertvector(half, U32) << 16));
  }
  V r(0.0f);
  for (int i = 0; i < n && i < N; ++i) {
    const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    r.v[i] = f;
  }
  return r;
}

// exp and tanh on float lanes: the same algorithms as cells.h's scalar exp_poly and
// tanh_poly (Cody-Waite reduction, degree-5 polynomial; odd polynomial below 0.625).
template <int N>
FASTRNN_INLINE Vec<float, N> exp(Vec<float, N> x) {
  using V = Vec<float, N>;
  x = vmax(vmin(x, V(88.0f)), V(-87.0f));
  const V n = (x * V(1.44269504088896341f) + V(12582912.0f)) - V(12582912.0f);
  const V r = (x - n * V(0.693359375f)) + n * V(2.12194440e-4f);
  V p(1.9875691500e-4f);
  p = p * r + V(1.3981999507e-3f);
  p = p * r + V(8.3334519073e-3f);
  p = p * r + V(4.1665795894e-2f);
  p = p * r + V(1.6666665459e-1f);
  p = p * r + V(5.0000001201e-1f);
  const V e = (p * r) * r + r + V(1.0f);
  const auto bits = (__builtin_convertvector(n.v, typename V::RawInt) + 127) << 23;
  return e * V::of((typename V::Raw)bits);
}

template <int N>
FASTRNN_INLINE Vec<float, N> tanh(Vec<float, N> x) {
  using V = Vec<float, N>;
  const V a = abs_bits(x);
  const V z = x * x;
  V p(-5.70498872745e-3f);
  p = p * z + V(2.06390887954e-2f);
  p = p * z - V(5.37397155531e-2f);
  p = p * z + V(1.33314422036e-1f);
  p = p * z - V(3.33332819422e-1f);
  const V small = x + x * z * p;
  const V big = V(1.0f) - V(2.0f) / (exp(V(2.0f) * a) + V(1.0f));
  return select_gt(V(0.625f), a, small, copysign_bits(big, x));
}

// Double lanes use the C library, lane by lane: the same values as the scalar path.
template <int N>
FASTRNN_INLINE Vec<double, N> exp(Vec<double, N> x) {
  for (int i = 0; i < N; ++i) x.v[i] = std::exp(x.v[i]);
  return x;
}
template <int N>
FASTRNN_INLINE Vec<double, N> tanh(Vec<double, N> x) {
  for (int i = 0; i < N; ++i) x.v[i] = std::tanh(x.v[i]);
  return x;
}

// The activations cells.h calls, for vectors (more specialised than its scalar templates).
template <class T, int N>
FASTRNN_INLINE Vec<T, N> sigmoid(Vec<T, N> x) {
  return Vec<T, N>(T(1)) / (Vec<T, N>(T(1)) + exp(-x));
}
template <class T, int N>
FASTRNN_INLINE Vec<T, N> tanh_act(Vec<T, N> x) { return tanh(x); }
template <class T, int N>
FASTRNN_INLINE Vec<T, N> relu(Vec<T, N> x) { return vmax(x, Vec<T, N>(T(0))); }
template <class T, int N>
FASTRNN_INLINE Vec<T, N> relu_grad(Vec<T, N> h, Vec<T, N> dh) {
  return select_gt(h, Vec<T, N>(T(0)), dh, Vec<T, N>(T(0)));
}

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn
