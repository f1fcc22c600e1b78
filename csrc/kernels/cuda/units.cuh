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
    if (a.m != nullptr) {
      a.m[idx] = zero<T>();
    } else {  // P == H without a projection
      a.hout[b * P + j] = a.hin[b * P + j];
      a.y[b * s.ldy + j] = zero<T>();
    }
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
  if (Cell::kHasCell) a.c[idx] = c;
  if (a.gates != nullptr) {
#pragma unroll
    for (int k = 0; k < S; ++k) a.gates[b * S * H + k * H + j] = store<T>(sv[k]);
  }
  const T hv = store<T>(h);
  if (a.m != nullptr) {
    a.m[idx] = hv;
  } else {
    a.hout[b * P + j] = hv;
    a.y[b * s.ldy + j] = hv;
  }
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
  // Gradient w.r.t. the cell output: through the projection, or dh + dy directly.
  const A dout = a.dm != nullptr
                     ? a.dm[idx]
                     : a.dh[b * P + j] + (a.dy != nullptr ? load(a.dy[b * s.ldy + j]) : A(0));
  A sv[S], gx[G], gh[G], dhp = A(0);
#pragma unroll
  for (int k = 0; k < S; ++k) sv[k] = load(a.gates[b * S * H + k * H + j]);
  A dcv = Cell::kHasCell ? a.dc[idx] : A(0);
  Cell::backward(sv, Cell::kUsesPrevH ? load(a.hprev[b * P + j]) : A(0),
                 Cell::kHasCell ? load(a.cprev[idx]) : A(0), dout, dcv, gx, gh, dhp);
#pragma unroll
  for (int k = 0; k < G; ++k) {
    dgx[k * H] = store<T>(gx[k]);
    if (Cell::kSplitGrad) dgh[k * H] = store<T>(gh[k]);
    if (dg != nullptr) dg[k * H] = store<T>(gh[k]);  // gh == gx unless kSplitGrad
  }
  if (Cell::kHasCell) a.dc[idx] = dcv;
  if (a.dm == nullptr) {
    a.dh[b * P + j] = dhp;  // the GEMM that follows adds dgh W_hh
  } else if (j < P) {
    a.dh[b * P + j] = A(0);  // projection (LSTM, no direct part): the GEMM sets it
  }
}

}  // namespace unit
}  // namespace cuda
}  // namespace fastrnn
