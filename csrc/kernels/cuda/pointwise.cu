// Per-step pointwise kernels of the CUDA recurrence (see recurrence.cuh): gate math from
// cells.h (in units.cuh), lengths masking and state writes, one thread per (direction, batch row, hidden
// unit); the directions of a layer share each launch.
// Torch-free; explicitly instantiated below for every cell and dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "recurrence.cuh"
#include "units.cuh"

namespace fastrnn {
namespace cuda {
namespace {

using namespace unit;  // load, store, zero, valid, forward_unit, backward_unit

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  // A grid-stride loop covers the rest; the cap keeps the grid size well within limits.
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20)));
}

// n units per direction in x, one grid row per direction (D is 1 or 2).
inline dim3 grid_for(int64_t n, int D) { return dim3(blocks_for(n), static_cast<unsigned>(D)); }

#define FASTRNN_GRID_STRIDE(i, n)                                                         \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// ---- kernels -------------------------------------------------------------------------
// One step's kernel: Unit::run(s, s.dir[d], idx) for the n elements of every direction d.
// Grid row blockIdx.y is the direction; each branch hands its direction's arguments to the
// inlined body with a constant index, so they are read straight from the parameter bank.
template <class Unit, class Step>
__global__ void __launch_bounds__(kThreads) step_kernel(const Step s, int64_t n) {
  FASTRNN_GRID_STRIDE(idx, n) {
    if (blockIdx.y == 0)
      Unit::run(s, s.dir[0], idx);
    else
      Unit::run(s, s.dir[1], idx);
  }
}

// The bodies (units.cuh and below), as types for step_kernel.
template <class Cell>
struct ForwardUnit {
  template <class S, class Dir>
  __device__ static void run(const S& s, const Dir& a, int64_t i) { forward_unit<Cell>(s, a, i); }
};
template <class Cell>
struct BackwardUnit {
  template <class S, class Dir>
  __device__ static void run(const S& s, const Dir& a, int64_t i) { backward_unit<Cell>(s, a, i); }
};
struct BackwardTailUnit {
  template <class S, class Dir>
  __device__ static void run(const S& s, const Dir& a, int64_t i) { backward_tail_unit(s, a, i); }
};

template <class T>
__device__ __forceinline__ void project_unit(const ProjectStep<T>& s, const ProjectStepDir<T>& a,
                                             int64_t idx) {
  const int64_t b = idx / s.P, q = idx - b * s.P;
  if (valid(s.lengths, b, a.t))  // hout holds the projection's value
    leave_state(a.x, s.lengths, s.B, s.P, b, q, load(a.hout[idx]), a.hin, a.hout,
                a.y + b * s.ldy + q);
  else
    carry_state(a.x, s.P, b, q, a.hin, a.hout, a.y + b * s.ldy + q);
}

template <class T>
__device__ __forceinline__ void project_grad_unit(const ProjectGradStep<T>& s,
                                                  const ProjectGradStepDir<T>& a, int64_t idx) {
  using A = acc_t<T>;
  const int64_t b = idx / s.P, q = idx - b * s.P;
  if (!valid(s.lengths, b, a.t)) {
    a.dhtot[idx] = zero<T>();
    return;
  }
  A v = a.dh[idx] + (a.dy != nullptr ? load(a.dy[b * s.ldy + q]) : A(0));
  if (a.x.zoneout_h != nullptr) {  // the cell's part goes on; zoneout's waits in dz
    const A z = load(a.x.zoneout_h[idx]);
    a.x.dz[idx] = z * v;
    v *= A(1) - z;
  }
  a.dhtot[idx] = store<T>(v);
}

struct ProjectUnit {
  template <class S, class Dir>
  __device__ static void run(const S& s, const Dir& a, int64_t i) { project_unit(s, a, i); }
};
struct ProjectGradUnit {
  template <class S, class Dir>
  __device__ static void run(const S& s, const Dir& a, int64_t i) { project_grad_unit(s, a, i); }
};

// Enqueues step_kernel<Unit> over n elements per direction of a.
template <class Unit, class Step>
cudaError_t launch_step(const Step& a, int64_t n, cudaStream_t stream) {
  if (a.D < 1 || a.D > kMaxDirs) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  step_kernel<Unit><<<grid_for(n, a.D), kThreads, 0, stream>>>(a, n);
  return cudaGetLastError();
}

template <class In, class Out>
__global__ void __launch_bounds__(kThreads) convert_kernel(int64_t n, const In* in, Out* out) {
  FASTRNN_GRID_STRIDE(i, n) out[i] = store<Out>(static_cast<acc_t<Out>>(load(in[i])));
}

template <class T>
__global__ void __launch_bounds__(kThreads) multiply_kernel(int64_t n, const T* a, const T* b,
                                                            T* out) {
  FASTRNN_GRID_STRIDE(i, n) out[i] = store<T>(load(a[i]) * load(b[i]));
}

template <class A>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(int64_t n, const A* in, A* out) {
  FASTRNN_GRID_STRIDE(i, n) out[i] += in[i];
}

#undef FASTRNN_GRID_STRIDE

}  // namespace

template <class T>
cudaError_t forward_step(CellKind kind, const ForwardStep<T>& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_cell(kind, [&](auto cell) {
    err = launch_step<ForwardUnit<decltype(cell)>>(a, a.B * a.H, stream);
  });
  return err;
}

template <class T>
cudaError_t project_step(const ProjectStep<T>& a, cudaStream_t stream) {
  return launch_step<ProjectUnit>(a, a.B * a.P, stream);
}

template <class T>
cudaError_t backward_step(CellKind kind, const BackwardStep<T>& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_cell(kind, [&](auto cell) {
    err = launch_step<BackwardUnit<decltype(cell)>>(a, a.B * a.H, stream);
  });
  return err;
}

template <class T>
cudaError_t project_grad_step(const ProjectGradStep<T>& a, cudaStream_t stream) {
  return launch_step<ProjectGradUnit>(a, a.B * a.P, stream);
}

template <class T>
cudaError_t backward_tail_step(const BackwardStep<T>& a, cudaStream_t stream) {
  return launch_step<BackwardTailUnit>(a, a.B * a.H, stream);
}

template <class In, class Out>
cudaError_t convert(int64_t n, const In* in, Out* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  convert_kernel<In, Out><<<blocks_for(n), kThreads, 0, stream>>>(n, in, out);
  return cudaGetLastError();
}

template <class T>
cudaError_t multiply(int64_t n, const T* a, const T* b, T* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  multiply_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(n, a, b, out);
  return cudaGetLastError();
}

template <class A>
cudaError_t accumulate(int64_t n, const A* in, A* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  accumulate_kernel<A><<<blocks_for(n), kThreads, 0, stream>>>(n, in, out);
  return cudaGetLastError();
}

// ---- explicit instantiations: every cell (through with_cell) for every dtype ------------

#define FASTRNN_INSTANTIATE(T)                                                            \
  template cudaError_t forward_step<T>(CellKind, const ForwardStep<T>&, cudaStream_t);    \
  template cudaError_t project_step<T>(const ProjectStep<T>&, cudaStream_t);              \
  template cudaError_t backward_step<T>(CellKind, const BackwardStep<T>&, cudaStream_t);  \
  template cudaError_t project_grad_step<T>(const ProjectGradStep<T>&, cudaStream_t);     \
  template cudaError_t backward_tail_step<T>(const BackwardStep<T>&, cudaStream_t);       \
  template cudaError_t multiply<T>(int64_t, const T*, const T*, T*, cudaStream_t);
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
template cudaError_t accumulate<float>(int64_t, const float*, float*, cudaStream_t);
template cudaError_t accumulate<double>(int64_t, const double*, double*, cudaStream_t);
#undef FASTRNN_INSTANTIATE_CONVERT
#undef FASTRNN_INSTANTIATE

}  // namespace cuda
}  // namespace fastrnn
