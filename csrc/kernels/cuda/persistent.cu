// Persistent forward of one layer (see forward_persistent in recurrence.cuh): the whole time
// loop in one cooperative launch, with W_hh on chip for the whole sequence.
//
// Grid: blockIdx.y is the direction, blockIdx.x a slice of `units` consecutive hidden units
// j0 .. j0 + units - 1 of it. A block loads the G rows of W_hh of each of its units into
// shared memory once. Every step then has two phases:
//   1. the recurrent product of its units, gh[b, g*H + j] = sum_k h[b, k] W_hh[g*H + j, k]
//      for every row b: the state entering the step is staged in shared memory, `rows` rows
//      at a time (read through L2 with __ldcg: other blocks wrote it), and one warp computes
//      all G gates of one unit for `lanes_b` rows, its 32 / lanes_b lane groups splitting k
//      and summing with shuffles;
//   2. forward_unit (units.cuh, the per-step path's own code) for the block's (b, j): gate
//      math, masking and every state and output write.
// One grid-wide barrier per step makes the new states visible to every block. A thread
// handles the same (b, j) in phase 2 at every step, so the LSTM cell state and the padded
// rows' carried state are only ever read back by the thread that wrote them.
//
// Precision: products and sums in acc_t<T> (float for __half/bfloat16), FP32 FMA for float
// (never TF32), so float32 results are at least as accurate as the per-step path's.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "recurrence.cuh"
#include "units.cuh"

namespace fastrnn {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256, kWarps = kThreads / 32;

// Gates per column of a unit's W_hh slice in shared memory: rounded up to 4 (one vector
// load per column) for LSTM and GRU; RNN has one.
constexpr int padded_gates(int G) { return G == 1 ? 1 : 4; }

template <class T>
struct PersistentForward {
  ForwardParams<T> p[kMaxDirs];  // p[0 .. D-1]; no projection, no per-step extras
  int D = 1;
  acc_t<T>* gh = nullptr;  // [D, B, G*H] workspace: the recurrent products of a step
  acc_t<T>* c = nullptr;   // [D, B, H] LSTM cell state (c0 converted in before the launch)
  T* hbuf = nullptr;       // [D, 2, B, H] ping-pong states (inference), as forward()'s
  int units = 1;           // hidden units per block
  int lanes_b = 1;         // batch rows per warp pass (a power of 2 <= 32)
  int rows = 1;            // batch rows staged at a time (a multiple of lanes_b)
  int hs = 0;              // row stride of the staged states (== 32 / lanes_b mod 32)
  int w_bytes = 0;         // bytes of the W_hh slices at the start of shared memory
};

// One column of a unit's W_hh slice: w[g] = W_hh[g*H + j, k] for g < 4 (or 1).
__device__ __forceinline__ void load_column(const float* p, float (&w)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
}
__device__ __forceinline__ void load_column(const __half* p, float (&w)[4]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&v.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&v.y));
  w[0] = a.x; w[1] = a.y; w[2] = b.x; w[3] = b.y;
}
__device__ __forceinline__ void load_column(const __nv_bfloat16* p, float (&w)[4]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
  w[0] = a.x; w[1] = a.y; w[2] = b.x; w[3] = b.y;
}
template <class T>
__device__ __forceinline__ void load_column(const T* p, acc_t<T> (&w)[1]) {
  w[0] = unit::load(*p);
}

template <class Cell, class T, int Dir>
__device__ __forceinline__ void persistent_direction(const PersistentForward<T>& q) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved, G4 = padded_gates(G);
  constexpr bool kLstm = std::is_same<Cell, Lstm>::value;
  const ForwardParams<T>& pd = q.p[Dir];
  const int64_t Tn = pd.T, B = pd.B, H = pd.H, GH = G * H;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * q.units;
  const int nu = static_cast<int>(std::min<int64_t>(q.units, H - j0));
  extern __shared__ __align__(16) unsigned char smem[];
  T* w_s = reinterpret_cast<T*>(smem);              // [units, H, G4]: unit u's column k
  A* h_s = reinterpret_cast<A*>(smem + q.w_bytes);  // [rows, hs]: staged states
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  for (int64_t i = tid; i < static_cast<int64_t>(nu) * H * G4; i += kThreads) {
    const int64_t u = i / (H * G4), r = i - u * H * G4, k = r / G4;
    const int g = static_cast<int>(r - k * G4);
    w_s[i] = g < G ? pd.w_hh[(g * H + j0 + u) * H + k] : unit::zero<T>();
  }
  // Lane (bl, ks) takes row bl of a warp pass and columns k = ks (mod KS): its staged
  // state lies in bank (bl * KS + ks + k) mod 32 since hs == KS (mod 32), a different bank
  // for each lane; lanes with the same ks read the same column of W_hh (a broadcast).
  const int Bl = q.lanes_b, KS = 32 / Bl, bl = lane % Bl, ks = lane / Bl;
  A* gh = q.gh + Dir * B * GH;
  cg::grid_group grid = cg::this_grid();
  for (int64_t s = 0; s < Tn; ++s) {
    T* hout[kMaxDirs];
    const ForwardStep<T> a = forward_step_args(q.p, q.D, G, S, kLstm, s, q.gh, q.c, q.hbuf,
                                               static_cast<T*>(nullptr), hout);
    const ForwardStepDir<T>& ad = a.dir[Dir];
    for (int64_t b0 = 0; b0 < B; b0 += q.rows) {
      const int nb = static_cast<int>(std::min<int64_t>(q.rows, B - b0));
      __syncthreads();  // the last rows' readers are done (and, first, w_s is written)
      for (int64_t i = tid; i < static_cast<int64_t>(nb) * H; i += kThreads) {
        const int64_t r = i / H, k = i - r * H;
        h_s[r * q.hs + k] = unit::load(__ldcg(ad.hin + (b0 + r) * H + k));
      }
      __syncthreads();
      const int groups = (nb + Bl - 1) / Bl;
      for (int task = warp; task < nu * groups; task += kWarps) {  // the same for all lanes
        const int u = task % nu, r = (task / nu) * Bl + bl;
        A acc[G];
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g] = A(0);
        if (r < nb) {
          const T* wu = w_s + static_cast<int64_t>(u) * H * G4;
          const A* hr = h_s + static_cast<int64_t>(r) * q.hs;
          for (int64_t k = ks; k < H; k += KS) {
            A w[G4];
            load_column(wu + k * G4, w);
            const A hv = hr[k];
#pragma unroll
            for (int g = 0; g < G; ++g) acc[g] += hv * w[g];
          }
        }
        for (int off = Bl; off < 32; off <<= 1) {  // sum over the lane groups splitting k
#pragma unroll
          for (int g = 0; g < G; ++g) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
        }
        if (ks == 0 && r < nb) {
#pragma unroll
          for (int g = 0; g < G; ++g) gh[(b0 + r) * GH + g * H + j0 + u] = acc[g];
        }
      }
    }
    __syncthreads();  // the block's part of gh is written and visible to the whole block
    for (int64_t i = tid; i < static_cast<int64_t>(nu) * B; i += kThreads) {
      const int64_t b = i / nu, u = i - b * nu;
      unit::forward_unit<Cell>(a, ad, b * H + j0 + u);
    }
    grid.sync();  // every new state is written before any block reads it
  }
}

template <class Cell, class T>
__global__ void __launch_bounds__(kThreads, 1)
    forward_persistent_kernel(const __grid_constant__ PersistentForward<T> q) {
  if (blockIdx.y == 0)
    persistent_direction<Cell, T, 0>(q);
  else
    persistent_direction<Cell, T, 1>(q);
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace

template <class T>
cudaError_t forward_persistent(CellKind kind, const ForwardParams<T>* p, int D,
                               acc_t<T>* ws_acc, T* ws, cudaStream_t stream) {
  using A = acc_t<T>;
  if (D < 1 || D > kMaxDirs) return cudaErrorInvalidValue;
  const ForwardParams<T>& p0 = p[0];
  if (p0.w_hr != nullptr || p0.layer_norm() ||
      p0.resets != nullptr || p0.zoneout_h != nullptr || p0.rec_mask != nullptr ||
      p0.T * p0.B * p0.H == 0) {
    return cudaErrorNotSupported;
  }
  const int64_t B = p0.B, H = p0.H;
  const int G = gates_of(kind), G4 = padded_gates(G);
  int dev = 0, coop = 0, sms = 0, smem_max = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  }
  if (err != cudaSuccess) return err;
  if (!coop) return cudaErrorNotSupported;

  // One block per SM: each direction's units spread over its share of the SMs.
  const int64_t per_dir = std::max<int64_t>(1, sms / D);
  const int64_t units = (H + std::min(H, per_dir) - 1) / std::min(H, per_dir);
  const int64_t blocks = (H + units - 1) / units;
  const int64_t w_bytes = round_up(units * H * G4 * static_cast<int64_t>(sizeof(T)), 16);
  int lanes_b = 1;
  while (lanes_b < 32 && lanes_b < B) lanes_b *= 2;
  auto row_bytes = [&](int lb) {  // hs == 32 / lb (mod 32)
    return (round_up(H, 32) + (32 / lb) % 32) * static_cast<int64_t>(sizeof(A));
  };
  while (lanes_b > 1 && w_bytes + lanes_b * row_bytes(lanes_b) > smem_max) lanes_b /= 2;
  if (w_bytes + lanes_b * row_bytes(lanes_b) > smem_max) return cudaErrorNotSupported;
  const int64_t rows = std::min(round_up(B, lanes_b),
                                (smem_max - w_bytes) / row_bytes(lanes_b) / lanes_b * lanes_b);
  const int64_t smem = w_bytes + rows * row_bytes(lanes_b);

  PersistentForward<T> q;
  for (int d = 0; d < D; ++d) q.p[d] = p[d];
  q.D = D;
  q.gh = ws_acc;
  q.c = ws_acc + D * B * G * H;
  q.hbuf = ws;
  q.units = static_cast<int>(units);
  q.lanes_b = lanes_b;
  q.rows = static_cast<int>(rows);
  q.hs = static_cast<int>(row_bytes(lanes_b) / static_cast<int64_t>(sizeof(A)));
  q.w_bytes = static_cast<int>(w_bytes);

  with_cell(kind, [&](auto cell) {
    const auto kernel = forward_persistent_kernel<decltype(cell), T>;
    int per_sm = 0;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err == cudaSuccess) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                          static_cast<size_t>(smem));
    }
    if (err != cudaSuccess) return;
    if (static_cast<int64_t>(per_sm) * sms < blocks * D) {  // not all co-resident
      err = cudaErrorNotSupported;
      return;
    }
    if (kind == CellKind::LSTM) {
      for (int d = 0; d < D && err == cudaSuccess; ++d)
        err = convert(B * H, p[d].c0, q.c + d * B * H, stream);
    }
    if (err != cudaSuccess) return;
    void* args[] = {&q};
    err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                      dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(D)),
                                      dim3(kThreads), args, static_cast<size_t>(smem), stream);
    if (err == cudaErrorCooperativeLaunchTooLarge) {
      (void)cudaGetLastError();  // not sticky: the per-step path runs instead
      err = cudaErrorNotSupported;
    }
    if (kind == CellKind::LSTM) {
      for (int d = 0; d < D && err == cudaSuccess; ++d)
        err = convert(B * H, static_cast<const A*>(q.c + d * B * H), p[d].c_n, stream);
    }
  });
  return err;
}

template cudaError_t forward_persistent<float>(CellKind, const ForwardParams<float>*, int,
                                               float*, float*, cudaStream_t);
template cudaError_t forward_persistent<__half>(CellKind, const ForwardParams<__half>*, int,
                                                float*, __half*, cudaStream_t);
template cudaError_t forward_persistent<__nv_bfloat16>(CellKind,
                                                       const ForwardParams<__nv_bfloat16>*, int,
                                                       float*, __nv_bfloat16*, cudaStream_t);

}  // namespace cuda
}  // namespace fastrnn
