// Device code for one (direction, batch row, hidden unit) of a step, shared by the per-step
// kernels (pointwise.cu) and the persistent kernel (persistent.cu): conversions between the
// storage and accumulation types, the lengths mask, and the gate math (forward and
// backward) and state writes of cells.h. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "recurrence.cuh"

namespace fastrnn {
namespace cuda {
namespace unit {

// ---- loads and stores: storage type <-> accumulation type ------------------------------

__device__ __forceinline__ float load(const __half& v) { return __half2float(v); }
__device__ __forceinline__ float load(const __nv_bfloat16& v) { return __bfloat162float(v); }
__device__ __forceinline__ float load(const float& v) { return v; }
__device__ __forceinline__ double load(const double& v) { return v; }

template <class T> __device__ __forceinline__ T store(acc_t<T> v);
template <> __device__ __forceinline__ __half store<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ double store<double>(double v) { return v; }

template <class T> __device__ __forceinline__ T zero() { return store<T>(acc_t<T>(0)); }

__device__ __forceinline__ bool valid(const int64_t* lengths, int64_t b, int64_t t) {
  return lengths == nullptr || t < lengths[b];
}

// Whether row b takes the initial state as the state leaving this forward step (x.t_reset
// is the next step's time), or sends the gradient of the state entering this backward step
// to dh0/dc0 (x.t_reset is this step's time). See reset_before in params.h.
template <class T>
__device__ __forceinline__ bool reset_row(const Extras<T>& x, const int64_t* lengths,
                                          int64_t B, int64_t b) {
  return x.resets != nullptr && x.t_reset >= 0 &&
         reset_before(x.resets, lengths, x.steps, B, x.reverse, x.t_reset, b);
}

// The state leaving a valid row's step, unit q of row b (of P), from the new value hnew (the
// cell's, or the projection's): zoneout, the output y, a reset, the copy times rec_mask.
template <class T>
__device__ __forceinline__ void leave_state(const Extras<T>& x, const int64_t* lengths,
                                            int64_t B, int64_t P, int64_t b, int64_t q,
                                            acc_t<T> hnew, const T* hin, T* hout, T* y) {
  using A = acc_t<T>;
  const int64_t i = b * P + q;
  if (x.zoneout_h != nullptr) {
    const A z = load(x.zoneout_h[i]);
    hnew = z * load(hin[i]) + (A(1) - z) * hnew;
  }
  T hv = store<T>(hnew);
  *y = hv;
  if (reset_row(x, lengths, B, b)) hv = x.h0[i];
  hout[i] = hv;
  if (x.hrec != nullptr) x.hrec[i] = store<T>(load(hv) * load(x.rec_mask[i]));
}

// A padded row's step: the state passes through (and its copy times rec_mask with it, for
// a reverse direction whose row starts later); y is zero. No reset applies to a padded row.
template <class T>
__device__ __forceinline__ void carry_state(const Extras<T>& x, int64_t P, int64_t b, int64_t q,
                                            const T* hin, T* hout, T* y) {
  const int64_t i = b * P + q;
  hout[i] = hin[i];
  *y = zero<T>();
  if (x.hrec != nullptr) x.hrec[i] = store<T>(load(hin[i]) * load(x.rec_mask[i]));
}

template <class Cell, class T>
__device__ __forceinline__ void forward_unit(const ForwardStep<T>& s, const ForwardStepDir<T>& a,
                                             int64_t idx) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  const int64_t H = s.H, P = s.P, GH = G * H;
  const int64_t b = idx / H, j = idx - b * H;
  if (a.hin_copy != nullptr && j < P) a.hin_copy[b * P + j] = a.hin[b * P + j];
  if (Cell::kHasCell && a.cprev != nullptr) a.cprev[idx] = store<T>(a.c[idx]);
  if (!valid(s.lengths, b, a.t)) {  // padded: the state passes through, outputs are zero
    if (a.gates != nullptr) {  // never read by backward; kept defined
#pragma unroll
      for (int k = 0; k < S; ++k) a.gates[b * S * H + k * H + j] = zero<T>();
    }
    if (a.m != nullptr)
      a.m[idx] = zero<T>();
    else  // P == H without a projection
      carry_state(a.x, P, b, j, a.hin, a.hout, a.y + b * s.ldy + j);
    return;
  }
  A xg[G], hg[G], sv[S], h = A(0), c = A(0);
#pragma unroll
  for (int k = 0; k < G; ++k) {
    xg[k] = load(a.gx[b * s.ldgx + k * H + j]);
    hg[k] = a.gh[b * GH + k * H + j] + (a.b_hh != nullptr ? load(a.b_hh[k * H + j]) : A(0));
  }
  Cell::forward(xg, hg, Cell::kUsesPrevH ? load(a.hin[b * P + j]) : A(0),
                Cell::kHasCell ? a.c[idx] : A(0), h, c, sv);
  if (Cell::kHasCell) {
    if (a.x.zoneout_c != nullptr) {
      const A z = load(a.x.zoneout_c[idx]);
      c = z * a.c[idx] + (A(1) - z) * c;
    }
    a.c[idx] = reset_row(a.x, s.lengths, s.B, b) ? load(a.x.c0[idx]) : c;
  }
  if (a.gates != nullptr) {
#pragma unroll
    for (int k = 0; k < S; ++k) a.gates[b * S * H + k * H + j] = store<T>(sv[k]);
  }
  if (a.m != nullptr)
    a.m[idx] = store<T>(h);  // the projection's kernel finishes the state
  else
    leave_state(a.x, s.lengths, s.B, P, b, j, h, a.hin, a.hout, a.y + b * s.ldy + j);
}

template <class Cell, class T>
__device__ __forceinline__ void backward_unit(const BackwardStep<T>& s,
                                              const BackwardStepDir<T>& a, int64_t idx) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  const int64_t H = s.H, P = s.P, GH = G * H;
  const int64_t b = idx / H, j = idx - b * H;
  T* dgx = a.dgx + b * s.ldg + j;
  T* dgh = a.dgh + b * s.ldg + j;
  T* dg = a.dg != nullptr ? a.dg + b * GH + j : nullptr;
  if (!valid(s.lengths, b, a.t)) {  // padded: no gradient; dh and dc pass through
#pragma unroll
    for (int k = 0; k < G; ++k) {
      dgx[k * H] = zero<T>();
      if (Cell::kSplitGrad) dgh[k * H] = zero<T>();
      if (dg != nullptr) dg[k * H] = zero<T>();
    }
    return;
  }
  // Gradient w.r.t. the cell output: through the projection, or dh + dy directly; with
  // zoneout the cell gets (1 - z) of it and the state entering the step z (dzh).
  A dout = a.dm != nullptr
               ? a.dm[idx]
               : a.dh[b * P + j] + (a.dy != nullptr ? load(a.dy[b * s.ldy + j]) : A(0));
  A dzh = A(0), dzc = A(0);
  if (a.dm == nullptr && a.x.zoneout_h != nullptr) {
    const A z = load(a.x.zoneout_h[b * P + j]);
    dzh = z * dout;
    dout *= A(1) - z;
  }
  A sv[S], gx[G], gh[G], dhp = A(0);
#pragma unroll
  for (int k = 0; k < S; ++k) sv[k] = load(a.gates[b * S * H + k * H + j]);
  A dcv = Cell::kHasCell ? a.dc[idx] : A(0);
  if (Cell::kHasCell && a.x.zoneout_c != nullptr) {
    const A z = load(a.x.zoneout_c[idx]);
    dzc = z * dcv;
    dcv *= A(1) - z;
  }
  Cell::backward(sv, Cell::kUsesPrevH ? load(a.hprev[b * P + j]) : A(0),
                 Cell::kHasCell ? load(a.cprev[idx]) : A(0), dout, dcv, gx, gh, dhp);
#pragma unroll
  for (int k = 0; k < G; ++k) {
    dgx[k * H] = store<T>(gx[k]);
    if (Cell::kSplitGrad) dgh[k * H] = store<T>(gh[k]);
    if (dg != nullptr) dg[k * H] = store<T>(gh[k]);  // gh == gx unless kSplitGrad
  }
  if (Cell::kHasCell) a.dc[idx] = dcv + dzc;
  if (a.dm == nullptr) {
    a.dh[b * P + j] = dhp + dzh;  // the GEMM that follows adds dgh W_hh
  } else if (j < P) {
    // projection (LSTM, no direct part): the GEMM adds to zoneout's part, if any
    a.dh[b * P + j] = a.x.dz != nullptr ? a.x.dz[b * P + j] : A(0);
  }
}

// After the backward step's recurrent GEMM, unit j of row b (of H; the first P also of dh):
// dh += drec * rec_mask, then at a reset the gradient of the state entering the step goes to
// dh0acc/dc0acc and stops there (see Extras). Valid rows only.
template <class T>
__device__ __forceinline__ void backward_tail_unit(const BackwardStep<T>& s,
                                                   const BackwardStepDir<T>& a, int64_t idx) {
  const int64_t H = s.H, P = s.P;
  const int64_t b = idx / H, j = idx - b * H;
  if (!valid(s.lengths, b, a.t)) return;
  const Extras<T>& x = a.x;
  if (j < P && x.drec != nullptr) a.dh[b * P + j] += x.drec[b * P + j] * load(x.rec_mask[b * P + j]);
  if (!reset_row(x, s.lengths, s.B, b)) return;
  if (j < P) {
    x.dh0acc[b * P + j] += a.dh[b * P + j];
    a.dh[b * P + j] = acc_t<T>(0);
  }
  if (a.dc != nullptr) {
    x.dc0acc[idx] += a.dc[idx];
    a.dc[idx] = acc_t<T>(0);
  }
}

}  // namespace unit
}  // namespace cuda
}  // namespace fastrnn
