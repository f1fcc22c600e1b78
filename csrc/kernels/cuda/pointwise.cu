// Per-step pointwise kernels of the CUDA recurrence (see recurrence.cuh): gate math from
// cells.h, lengths masking and state writes, one thread per (batch row, hidden unit).
// Torch-free; explicitly instantiated below for every cell and dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "recurrence.cuh"

namespace fastrnn {
namespace cuda {
namespace {

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

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  // A grid-stride loop covers the rest; the cap keeps the grid size well within limits.
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)));
}

#define FASTRNN_GRID_STRIDE(i, n)                                                         \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// ---- kernels -------------------------------------------------------------------------

template <class Cell, class T>
__global__ void __launch_bounds__(kThreads) forward_step_kernel(const ForwardStep<T> a) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  const int64_t H = a.H, P = a.P, GH = G * H;
  FASTRNN_GRID_STRIDE(idx, a.B * H) {
    const int64_t b = idx / H, j = idx - b * H;
    if (a.hin_copy != nullptr && j < P) a.hin_copy[b * P + j] = a.hin[b * P + j];
    if (Cell::kHasCell && a.cprev != nullptr) a.cprev[idx] = store<T>(a.c[idx]);
    if (!valid(a.lengths, b, a.t)) {  // padded: the state passes through, outputs are zero
      if (a.gates != nullptr) {  // never read by backward; kept defined
#pragma unroll
        for (int k = 0; k < S; ++k) a.gates[b * S * H + k * H + j] = zero<T>();
      }
      if (a.m != nullptr) {
        a.m[idx] = zero<T>();
      } else {  // P == H without a projection
        a.hout[b * P + j] = a.hin[b * P + j];
        a.y[b * a.ldy + j] = zero<T>();
      }
      continue;
    }
    A xg[G], hg[G], sv[S], h = A(0), c = A(0);
#pragma unroll
    for (int k = 0; k < G; ++k) {
      xg[k] = load(a.gx[b * a.ldgx + k * H + j]);
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
      a.y[b * a.ldy + j] = hv;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) project_step_kernel(const ProjectStep<T> a) {
  FASTRNN_GRID_STRIDE(idx, a.B * a.P) {
    const int64_t b = idx / a.P, q = idx - b * a.P;
    if (valid(a.lengths, b, a.t)) {
      a.y[b * a.ldy + q] = a.hout[idx];
    } else {
      a.hout[idx] = a.hin[idx];
      a.y[b * a.ldy + q] = zero<T>();
    }
  }
}

template <class Cell, class T>
__global__ void __launch_bounds__(kThreads) backward_step_kernel(const BackwardStep<T> a) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  const int64_t H = a.H, P = a.P;
  FASTRNN_GRID_STRIDE(idx, a.B * H) {
    const int64_t b = idx / H, j = idx - b * H;
    T* dgx = a.dgx + b * a.ldg + j;
    T* dgh = a.dgh + b * a.ldg + j;
    if (!valid(a.lengths, b, a.t)) {  // padded: no gradient; dh and dc pass through
#pragma unroll
      for (int k = 0; k < G; ++k) {
        dgx[k * H] = zero<T>();
        if (Cell::kSplitGrad) dgh[k * H] = zero<T>();
      }
      continue;
    }
    // Gradient w.r.t. the cell output: through the projection, or dh + dy directly.
    const A dout = a.dm != nullptr
                       ? a.dm[idx]
                       : a.dh[b * P + j] + (a.dy != nullptr ? load(a.dy[b * a.ldy + j]) : A(0));
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
    }
    if (Cell::kHasCell) a.dc[idx] = dcv;
    if (a.dm == nullptr) {
      a.dh[b * P + j] = dhp;  // the GEMM that follows adds dgh W_hh
    } else if (j < P) {
      a.dh[b * P + j] = A(0);  // projection (LSTM, no direct part): the GEMM sets it
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) project_grad_step_kernel(const ProjectGradStep<T> a) {
  using A = acc_t<T>;
  FASTRNN_GRID_STRIDE(idx, a.B * a.P) {
    const int64_t b = idx / a.P, q = idx - b * a.P;
    a.dhtot[idx] = valid(a.lengths, b, a.t)
                       ? store<T>(a.dh[idx] + (a.dy != nullptr ? load(a.dy[b * a.ldy + q]) : A(0)))
                       : zero<T>();
  }
}

template <class In, class Out>
__global__ void __launch_bounds__(kThreads) convert_kernel(int64_t n, const In* in, Out* out) {
  FASTRNN_GRID_STRIDE(i, n) out[i] = store<Out>(static_cast<acc_t<Out>>(load(in[i])));
}

#undef FASTRNN_GRID_STRIDE

template <class Fn>
void with_cell(CellKind kind, Fn&& fn) {
  switch (kind) {
    case CellKind::LSTM: fn(Lstm{}); break;
    case CellKind::GRU: fn(Gru{}); break;
    case CellKind::RNN_TANH: fn(Rnn<false>{}); break;
    case CellKind::RNN_RELU: fn(Rnn<true>{}); break;
  }
}

}  // namespace

template <class T>
cudaError_t forward_step(CellKind kind, const ForwardStep<T>& a, cudaStream_t stream) {
  const int64_t n = a.B * a.H;
  if (n == 0) return cudaSuccess;
  with_cell(kind, [&](auto cell) {
    forward_step_kernel<decltype(cell), T><<<blocks_for(n), kThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

template <class T>
cudaError_t project_step(const ProjectStep<T>& a, cudaStream_t stream) {
  const int64_t n = a.B * a.P;
  if (n == 0) return cudaSuccess;
  project_step_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <class T>
cudaError_t backward_step(CellKind kind, const BackwardStep<T>& a, cudaStream_t stream) {
  const int64_t n = a.B * a.H;
  if (n == 0) return cudaSuccess;
  with_cell(kind, [&](auto cell) {
    backward_step_kernel<decltype(cell), T><<<blocks_for(n), kThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

template <class T>
cudaError_t project_grad_step(const ProjectGradStep<T>& a, cudaStream_t stream) {
  const int64_t n = a.B * a.P;
  if (n == 0) return cudaSuccess;
  project_grad_step_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <class In, class Out>
cudaError_t convert(int64_t n, const In* in, Out* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  convert_kernel<In, Out><<<blocks_for(n), kThreads, 0, stream>>>(n, in, out);
  return cudaGetLastError();
}

// ---- explicit instantiations: every cell (through with_cell) for every dtype ------------

#define FASTRNN_INSTANTIATE(T)                                                            \
  template cudaError_t forward_step<T>(CellKind, const ForwardStep<T>&, cudaStream_t);    \
  template cudaError_t project_step<T>(const ProjectStep<T>&, cudaStream_t);              \
  template cudaError_t backward_step<T>(CellKind, const BackwardStep<T>&, cudaStream_t);  \
  template cudaError_t project_grad_step<T>(const ProjectGradStep<T>&, cudaStream_t);
#define FASTRNN_INSTANTIATE_CONVERT(In, Out) \
  template cudaError_t convert<In, Out>(int64_t, const In*, Out*, cudaStream_t);

FASTRNN_INSTANTIATE(float)
FASTRNN_INSTANTIATE(double)
FASTRNN_INSTANTIATE(__half)
FASTRNN_INSTANTIATE(__nv_bfloat16)
FASTRNN_INSTANTIATE_CONVERT(float, float)
FASTRNN_INSTANTIATE_CONVERT(double, double)
FASTRNN_INSTANTIATE_CONVERT(__half, float)
FASTRNN_INSTANTIATE_CONVERT(float, __half)
FASTRNN_INSTANTIATE_CONVERT(__nv_bfloat16, float)
FASTRNN_INSTANTIATE_CONVERT(float, __nv_bfloat16)
#undef FASTRNN_INSTANTIATE_CONVERT
#undef FASTRNN_INSTANTIATE

}  // namespace cuda
}  // namespace fastrnn
