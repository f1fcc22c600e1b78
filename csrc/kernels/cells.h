// Per-cell gate math, written once and shared by the CPU and CUDA recurrence drivers.
// Torch-free: plain C++ that also compiles as CUDA device code.
//
// Conventions for one hidden unit j of one batch row:
//   xg[k]  input part of gate k's pre-activation:     (x W_ih^T + b_ih)[k*H + j]
//   hg[k]  recurrent part of gate k's pre-activation: (h W_hh^T + b_hh)[k*H + j]
//   hp, cp the unit's previous hidden / cell state (hp only read by GRU, cp only by LSTM)
//   save[k] what the backward pass needs, kept per unit (kSaved values)
// Gate order follows torch.nn: LSTM i,f,g,o; GRU r,z,n; RNN a single gate.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTRNN_HD __host__ __device__ __forceinline__
#else
#define FASTRNN_HD inline __attribute__((always_inline))
#endif

namespace fastrnn {

enum class CellKind { LSTM, GRU, RNN_TANH, RNN_RELU };

// ---- activations --------------------------------------------------------------------
// float on the CPU uses branch-free polynomials so the gate loops vectorise (libm calls
// do not); double and device code use the accurate library functions.

namespace detail {
// exp(x) for float, Cody-Waite range reduction + degree-5 minimax polynomial (~1 ulp).
inline __attribute__((always_inline)) float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // n = round(x / ln2) by the 1.5 * 2^23 trick: std::floor/nearbyint block vectorisation.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

inline __attribute__((always_inline)) float tanh_poly(float x) {
  const float a = std::fabs(x);
  // Small |x|: odd polynomial (avoids cancellation in 1 - 2/(e^2a + 1)).
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = x + x * z * p;
  const float big = 1.0f - 2.0f / (exp_poly(2.0f * a) + 1.0f);
  return a < 0.625f ? small : std::copysign(big, x);
}
}  // namespace detail

// Templates so that a SIMD vector type can supply its own (cpu/simd.h): the CPU kernels
// run this file's cell math on several units at once.
template <class T> FASTRNN_HD T sigmoid(T x) { return T(1) / (T(1) + exp(-x)); }
template <class T> FASTRNN_HD T tanh_act(T x) { return tanh(x); }
template <class T> FASTRNN_HD T relu(T x) { return x < T(0) ? T(0) : x; }  // NaN stays NaN
template <class T> FASTRNN_HD T relu_grad(T h, T dh) { return h > T(0) ? dh : T(0); }

#if !defined(__CUDA_ARCH__)
template <> FASTRNN_HD float sigmoid<float>(float x) {
  return 1.0f / (1.0f + detail::exp_poly(-x));
}
template <> FASTRNN_HD float tanh_act<float>(float x) { return detail::tanh_poly(x); }
#endif

// ---- cells ---------------------------------------------------------------------------
// forward(xg, hg, hp, cp, h, c, save): h is the unit's output (before any projection).
// backward(save, hp, cp, dh, dc, dgx, dgh, dhp):
//   dh   gradient w.r.t. the unit output h;  dc in/out: gradient w.r.t. c (new -> previous)
//   dgx  gradient w.r.t. the gate pre-activations' input parts  (feeds dW_ih, db_ih, dx)
//   dgh  gradient w.r.t. the recurrent parts (feeds dW_hh, db_hh, dh_prev via W_hh); it
//        equals dgx except for GRU, where r scales the recurrent part of n
//   dhp  the direct (non-GEMM) part of the gradient w.r.t. hp
// kHasCell: carries c (LSTM). kUsesPrevH: reads hp. kSplitGrad: dgh differs from dgx.

struct Lstm {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 4;  // activated i, f, g, o
  static constexpr bool kHasCell = true;
  static constexpr bool kUsesPrevH = false;
  static constexpr bool kSplitGrad = false;

  static constexpr bool kLayerNorm = false;

  // The gates and the new cell state c (save: activated i, f, g, o).
  template <class T>
  FASTRNN_HD static void state(const T* xg, const T* hg, T cp, T& c, T* save) {
    const T i = sigmoid(xg[0] + hg[0]);
    const T f = sigmoid(xg[1] + hg[1]);
    const T g = tanh_act(xg[2] + hg[2]);
    const T o = sigmoid(xg[3] + hg[3]);
    c = f * cp + i * g;
    save[0] = i; save[1] = f; save[2] = g; save[3] = o;
  }

  template <class T>
  FASTRNN_HD static void forward(const T* xg, const T* hg, T /*hp*/, T cp, T& h, T& c, T* save) {
    state(xg, hg, cp, c, save);
    h = save[3] * tanh_act(c);
  }

  // state's backward: dct, the total gradient w.r.t. the new c, to the i, f, g parts of
  // dgx and to dc, the gradient w.r.t. the previous c.
  template <class T>
  FASTRNN_HD static void state_backward(const T* save, T cp, T dct, T* dgx, T& dc) {
    const T i = save[0], f = save[1], g = save[2];
    dgx[0] = dct * g * i * (T(1) - i);
    dgx[1] = dct * cp * f * (T(1) - f);
    dgx[2] = dct * i * (T(1) - g * g);
    dc = dct * f;
  }

  template <class T>
  FASTRNN_HD static void backward(const T* save, T /*hp*/, T cp, T dh, T& dc, T* dgx, T* dgh,
                                  T& dhp) {
    const T i = save[0], f = save[1], g = save[2], o = save[3];
    const T tc = tanh_act(f * cp + i * g);  // recomputed rather than stored
    const T dct = dc + dh * o * (T(1) - tc * tc);
    dgx[3] = dh * tc * o * (T(1) - o);
    state_backward(save, cp, dct, dgx, dc);
    for (int k = 0; k < 4; ++k) dgh[k] = dgx[k];
    dhp = T(0);
  }
};

struct Gru {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;  // r, z, n, and hg_n = (W_hn h + b_hn), needed for dr
  static constexpr bool kHasCell = false;
  static constexpr bool kUsesPrevH = true;
  static constexpr bool kSplitGrad = true;
  static constexpr bool kLayerNorm = false;

  template <class T>
  FASTRNN_HD static void forward(const T* xg, const T* hg, T hp, T /*cp*/, T& h, T& /*c*/,
                                 T* save) {
    const T r = sigmoid(xg[0] + hg[0]);
    const T z = sigmoid(xg[1] + hg[1]);
    const T n = tanh_act(xg[2] + r * hg[2]);
    h = n + z * (hp - n);  // == (1 - z) * n + z * hp
    save[0] = r; save[1] = z; save[2] = n; save[3] = hg[2];
  }

  template <class T>
  FASTRNN_HD static void backward(const T* save, T hp, T /*cp*/, T dh, T& /*dc*/, T* dgx,
                                  T* dgh, T& dhp) {
    const T r = save[0], z = save[1], n = save[2], hgn = save[3];
    const T dn = dh * (T(1) - z) * (T(1) - n * n);
    const T dz = dh * (hp - n) * z * (T(1) - z);
    const T dr = dn * hgn * r * (T(1) - r);
    dgx[0] = dr; dgx[1] = dz; dgx[2] = dn;
    dgh[0] = dr; dgh[1] = dz; dgh[2] = dn * r;
    dhp = dh * z;
  }
};

template <bool Relu>
struct Rnn {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 1;  // the output h
  static constexpr bool kHasCell = false;
  static constexpr bool kUsesPrevH = false;
  static constexpr bool kSplitGrad = false;
  static constexpr bool kLayerNorm = false;

  template <class T>
  FASTRNN_HD static void forward(const T* xg, const T* hg, T /*hp*/, T /*cp*/, T& h, T& /*c*/,
                                 T* save) {
    const T a = xg[0] + hg[0];
    h = Relu ? relu(a) : tanh_act(a);
    save[0] = h;
  }

  template <class T>
  FASTRNN_HD static void backward(const T* save, T /*hp*/, T /*cp*/, T dh, T& /*dc*/, T* dgx,
                                  T* dgh, T& dhp) {
    const T h = save[0];
    dgx[0] = Relu ? relu_grad(h, dh) : dh * (T(1) - h * h);
    dgh[0] = dgx[0];
    dhp = T(0);
  }
};

// ---- LayerNorm cells (Ba et al. 2016) --------------------------------------------------
// The recurrent parts are layer-normalised over the whole G*H gate vector of a row before
// the cell math: hg = ln_w * norm(h W_hh^T) + ln_b (+ b_hh). The driver does that (it needs
// the whole row). It saves only the normalised values norm(h W_hh^T), at save[k] (and
// LnLstm's norm(c)): the backward recomputes the gates from them and the input parts,
// which costs a few vector operations where saving them would cost memory traffic.
// kCellSaved: the plain cell's own saved values, recomputed.

struct LnGru : Gru {
  static constexpr bool kLayerNorm = true;
  static constexpr int kCellSaved = Gru::kSaved;
  static constexpr int kSaved = kGates;                // the norms
};

// LayerNorm LSTM also normalises the new c over the row's H units before the output's
// tanh: h = o * tanh(lnc_w * norm(c) + lnc_b). The driver runs state(), the statistics of
// c, then output().
struct LnLstm {
  static constexpr int kGates = 4;
  static constexpr int kCellSaved = Lstm::kSaved;
  static constexpr int kNormC = kGates;                // the norms, then norm(c)
  static constexpr int kSaved = kNormC + 1;
  static constexpr bool kHasCell = true;
  static constexpr bool kUsesPrevH = false;
  static constexpr bool kSplitGrad = false;
  static constexpr bool kLayerNorm = true;

  template <class T>
  FASTRNN_HD static void state(const T* xg, const T* hg, T cp, T& c, T* save) {
    Lstm::state(xg, hg, cp, c, save);
  }
  // o: the activated output gate; cn = norm(c); w, b: LN_c's weight and bias.
  template <class T>
  FASTRNN_HD static T output(T o, T cn, T w, T b) { return o * tanh_act(w * cn + b); }
  // output's backward: dgo, the gradient w.r.t. o's pre-activation, and du, w.r.t. LN_c's
  // output u = w * cn + b (so d(cn) = du * w, d(w) = du * cn, d(b) = du).
  template <class T>
  FASTRNN_HD static void output_backward(T o, T cn, T w, T b, T dh, T& dgo, T& du) {
    const T tu = tanh_act(w * cn + b);
    dgo = dh * tu * o * (T(1) - o);
    du = dh * o * (T(1) - tu * tu);
  }
  template <class T>
  FASTRNN_HD static void state_backward(const T* save, T cp, T dct, T* dgx, T& dc) {
    Lstm::state_backward(save, cp, dct, dgx, dc);
  }
};

inline int gates_of(CellKind kind) {
  switch (kind) {
    case CellKind::LSTM: return Lstm::kGates;
    case CellKind::GRU: return Gru::kGates;
    default: return 1;
  }
}

// Values saved per unit; layer_norm: the LayerNorm variant (LSTM and GRU only).
inline int saved_of(CellKind kind, bool layer_norm = false) {
  switch (kind) {
    case CellKind::LSTM: return layer_norm ? LnLstm::kSaved : Lstm::kSaved;
    case CellKind::GRU: return layer_norm ? LnGru::kSaved : Gru::kSaved;
    default: return 1;
  }
}

}  // namespace fastrnn
