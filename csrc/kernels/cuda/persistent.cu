// Persistent kernels of one layer (see forward_persistent and backward_persistent in
// recurrence.cuh): the whole time loop in one cooperative launch, with W_hh on chip for the
// whole sequence.
//
// Grid: blockIdx.y is the direction, blockIdx.x a slice of `units` consecutive hidden units
// j0 .. j0 + units - 1 of it; one block per SM. A block loads its units' part of W_hh into
// shared memory once: the G rows of each unit for the forward, the columns for the backward.
// Forward, every step:
//   1. the recurrent product of its units, gh[b, g*H + j] = sum_k h[b, k] W_hh[g*H + j, k]
//      for every row b (block_products);
//   2. forward_unit (units.cuh, the per-step path's own code) for the block's (b, j): gate
//      math, masking and every state and output write;
//   then one grid-wide barrier makes the new states visible to every block.
// Backward, every step from the last: backward_unit on the block's (b, j), one grid-wide
// barrier, then dh[b, j] += sum_r dgh[b, r] W_hh[r, j] for its units (run_direction).
// A thread handles the same (b, j) at every step, so the LSTM cell state, the padded rows'
// carried state and the running gradients of a unit are only read back by its own block.
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

// Gates per column of a unit's W_hh slice in the forward: rounded up to 4 (one vector load
// per column) for LSTM and GRU; RNN has one. The backward's slices have one value a column.
constexpr int padded_gates(int G) { return G == 1 ? 1 : 4; }

// How a block lays out and walks its products (host-chosen, see plan()).
struct Layout {
  int units = 1;    // hidden units per block
  int lanes_b = 1;  // batch rows per warp pass (a power of 2 <= 32)
  int rows = 1;     // batch rows staged in shared memory at a time (a multiple of lanes_b)
  int xs = 0;       // row stride of the staged rows, == 32 / lanes_b (mod 32)
  int w_bytes = 0;  // bytes of the W_hh slices at the start of shared memory (16-multiple)
  int blocks = 1;   // blocks per direction
  int smem = 0;     // dynamic shared memory per block, bytes
};

template <class T>
struct PersistentForward {
  ForwardParams<T> p[kMaxDirs];  // p[0 .. D-1]; no projection, no per-step extras
  int D = 1;
  acc_t<T>* gh = nullptr;  // [D, B, G*H] workspace: the recurrent products of a step
  acc_t<T>* c = nullptr;   // [D, B, H] LSTM cell state (c0 converted in before the launch)
  T* hbuf = nullptr;       // [D, 2, B, H] ping-pong states (inference), as forward()'s
  Layout l;
};

template <class T>
struct PersistentBackward {
  BackwardParams<T> p[kMaxDirs];  // p[0 .. D-1]; no projection, no per-step extras
  int D = 1;
  acc_t<T>* dh = nullptr;  // [D, B, H] running dL/dh (dh_n converted in before the launch)
  acc_t<T>* dc = nullptr;  // [D, B, H] running dL/dc (LSTM)
  Layout l;
};

// One column of a unit's W_hh slice: w[g] for g < 4 (or 1).
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

// The block's share of one step's recurrent product: for every row b < B and unit u < nu,
// out(b, u, acc) with acc[g] = sum_k x[b, k] * w_s[(u * K + k) * G4 + g], g < G. x [B, ldx]
// (first K columns) was written by other blocks in this launch, so it is read through L2
// (__ldcg); its rows are staged in shared memory l.rows at a time. One warp takes one unit
// and l.lanes_b rows: lane (bl, ks) takes row bl and columns k == ks (mod KS), KS = 32 /
// lanes_b, and the KS lane groups sum with shuffles. The staged row bl, column k lies in
// bank (bl * KS + k) mod 32 (xs == KS mod 32), and the lanes' k differ in k mod KS == ks:
// a different bank for every lane. Lanes with the same ks read the same column of w_s (a
// broadcast).
template <int G, int G4, class T, class Out>
__device__ __forceinline__ void block_products(const Layout& l, const T* x, int64_t ldx,
                                               int64_t B, int64_t K, const T* w_s, int nu,
                                               acc_t<T>* x_s, Out&& out) {
  using A = acc_t<T>;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int Bl = l.lanes_b, KS = 32 / Bl, bl = lane % Bl, ks = lane / Bl;
  for (int64_t b0 = 0; b0 < B; b0 += l.rows) {
    const int nb = static_cast<int>(B - b0 < l.rows ? B - b0 : l.rows);
    __syncthreads();  // the last rows' readers are done (and, first, w_s is written)
    for (int64_t i = tid; i < static_cast<int64_t>(nb) * K; i += kThreads) {
      const int64_t r = i / K, k = i - r * K;
      x_s[r * l.xs + k] = unit::load(__ldcg(x + (b0 + r) * ldx + k));
    }
    __syncthreads();
    const int groups = (nb + Bl - 1) / Bl;
    for (int task = warp; task < nu * groups; task += kWarps) {  // the same for all lanes
      const int u = task % nu, r = (task / nu) * Bl + bl;
      A acc[G];
#pragma unroll
      for (int g = 0; g < G; ++g) acc[g] = A(0);
      if (r < nb) {
        const T* wu = w_s + static_cast<int64_t>(u) * K * G4;
        const A* xr = x_s + static_cast<int64_t>(r) * l.xs;
        for (int64_t k = ks; k < K; k += KS) {
          A w[G4];
          load_column(wu + k * G4, w);
          const A xv = xr[k];
#pragma unroll
          for (int g = 0; g < G; ++g) acc[g] += xv * w[g];
        }
      }
      for (int off = Bl; off < 32; off <<= 1) {  // sum over the lane groups splitting k
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
      }
      if (ks == 0 && r < nb) out(b0 + r, u, acc);
    }
  }
}

// The units of this block: j0 .. j0 + units_here - 1 (the last block may have fewer).
__device__ __forceinline__ int units_here(const Layout& l, int64_t H, int64_t j0) {
  return static_cast<int>(H - j0 < l.units ? H - j0 : l.units);
}

template <class Cell, class T, int Dir>
__device__ __forceinline__ void run_direction(const PersistentForward<T>& q) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved, G4 = padded_gates(G);
  constexpr bool kLstm = std::is_same<Cell, Lstm>::value;
  const ForwardParams<T>& pd = q.p[Dir];
  const int64_t Tn = pd.T, B = pd.B, H = pd.H, GH = G * H;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * q.l.units;
  const int nu = units_here(q.l, H, j0);
  extern __shared__ __align__(16) unsigned char smem[];
  T* w_s = reinterpret_cast<T*>(smem);                // [units, H, G4]: W_hh[g*H + j, k]
  A* x_s = reinterpret_cast<A*>(smem + q.l.w_bytes);  // [rows, xs]: staged states
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(nu) * H * G4; i += kThreads) {
    const int64_t u = i / (H * G4), r = i - u * H * G4, k = r / G4;
    const int g = static_cast<int>(r - k * G4);
    w_s[i] = g < G ? pd.w_hh[(g * H + j0 + u) * H + k] : unit::zero<T>();
  }
  A* gh = q.gh + Dir * B * GH;
  cg::grid_group grid = cg::this_grid();
  for (int64_t s = 0; s < Tn; ++s) {
    T* hout[kMaxDirs];
    const ForwardStep<T> a = forward_step_args(q.p, q.D, G, S, kLstm, s, q.gh, q.c, q.hbuf,
                                               static_cast<T*>(nullptr),
                                               static_cast<T*>(nullptr), hout);
    const ForwardStepDir<T>& ad = a.dir[Dir];
    block_products<G, G4>(q.l, ad.hin, H, B, H, w_s, nu, x_s,
                          [&](int64_t b, int u, const A (&acc)[G]) {
#pragma unroll
                            for (int g = 0; g < G; ++g) gh[b * GH + g * H + j0 + u] = acc[g];
                          });
    __syncthreads();  // the block's part of gh is written and visible to the whole block
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(nu) * B; i += kThreads) {
      const int64_t b = i / nu, u = i - b * nu;
      unit::forward_unit<Cell>(a, ad, b * H + j0 + u);
    }
    grid.sync();  // every new state is written before any block reads it
  }
}

// The backward walks s = T-1 .. 0. The block owning units j0.. first runs backward_unit on
// them (the gate gradients of step s, into dgx/dgh at time t, and the direct part of dh),
// then, after the grid barrier, adds dgh(t) W_hh[:, j] to dh[:, j] for the same units: the
// columns of W_hh it keeps, each over all G*H gate gradients of every block. Each step's
// dgh lies in its own time slot, so no barrier is needed before the next step overwrites
// anything; dh and dc of a unit are only ever touched by its own block.
template <class Cell, class T, int Dir>
__device__ __forceinline__ void run_direction(const PersistentBackward<T>& q) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  constexpr bool kLstm = std::is_same<Cell, Lstm>::value;
  const BackwardParams<T>& pd = q.p[Dir];
  const int64_t Tn = pd.T, B = pd.B, H = pd.H, GH = G * H;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * q.l.units;
  const int nu = units_here(q.l, H, j0);
  extern __shared__ __align__(16) unsigned char smem[];
  T* w_s = reinterpret_cast<T*>(smem);                // [units, G*H]: W_hh[r, j0 + u]
  A* x_s = reinterpret_cast<A*>(smem + q.l.w_bytes);  // [rows, xs]: staged dgh rows
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(nu) * GH; i += kThreads) {
    const int64_t u = i / GH, r = i - u * GH;
    w_s[i] = pd.w_hh[r * H + j0 + u];
  }
  A* dh = q.dh + Dir * B * H;
  cg::grid_group grid = cg::this_grid();
  for (int64_t s = Tn - 1; s >= 0; --s) {
    const BackwardStep<T> a = backward_step_args(q.p, q.D, G, S, kLstm, s, q.dh, q.dc,
                                                 static_cast<A*>(nullptr),
                                                 static_cast<T*>(nullptr),
                                                 static_cast<A*>(nullptr));
    const BackwardStepDir<T>& ad = a.dir[Dir];
    __syncthreads();  // the last step's dh of these units is written (and w_s, first)
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(nu) * B; i += kThreads) {
      const int64_t b = i / nu, u = i - b * nu;
      unit::backward_unit<Cell>(a, ad, b * H + j0 + u);
    }
    grid.sync();  // every gate gradient of step s is written before any block reads it
    block_products<1, 1>(q.l, ad.dgh, pd.ldg, B, GH, w_s, nu, x_s,
                         [&](int64_t b, int u, const A (&acc)[1]) { dh[b * H + j0 + u] += acc[0]; });
  }
}

// Q is PersistentForward<T> or PersistentBackward<T>: run_direction picks the body.
template <class Cell, class T, class Q>
__global__ void __launch_bounds__(kThreads, 1) persistent_kernel(const __grid_constant__ Q q) {
  if (blockIdx.y == 0)
    run_direction<Cell, T, 0>(q);
  else
    run_direction<Cell, T, 1>(q);
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The layout for D directions of H units whose W_hh slices hold K values of `w_size` bytes
// per unit, over rows of K columns staged in acc_size-byte elements; false if no layout
// fits the device (one block per SM, everything in shared memory).
bool plan(int64_t D, int64_t H, int64_t K, int64_t B, int64_t w_size, int64_t acc_size,
          Layout& l) {
  int dev = 0, coop = 0, sms = 0, smem_max = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
          cudaSuccess || !coop) {
    return false;
  }
  // One block per SM: each direction's units spread over its share of the SMs.
  const int64_t per_dir = std::min<int64_t>(H, std::max<int64_t>(1, sms / D));
  const int64_t units = (H + per_dir - 1) / per_dir;
  const int64_t w_bytes = round_up(units * K * w_size, 16);
  auto row_bytes = [&](int64_t lanes_b) { return (round_up(K, 32) + (32 / lanes_b) % 32) * acc_size; };
  int64_t lanes_b = 1;
  while (lanes_b < 32 && lanes_b < B) lanes_b *= 2;
  while (lanes_b > 1 && w_bytes + lanes_b * row_bytes(lanes_b) > smem_max) lanes_b /= 2;
  if (w_bytes + lanes_b * row_bytes(lanes_b) > smem_max) return false;
  const int64_t rows = std::min(round_up(B, lanes_b),
                                (smem_max - w_bytes) / row_bytes(lanes_b) / lanes_b * lanes_b);
  l.units = static_cast<int>(units);
  l.lanes_b = static_cast<int>(lanes_b);
  l.rows = static_cast<int>(rows);
  l.xs = static_cast<int>(row_bytes(lanes_b) / acc_size);
  l.w_bytes = static_cast<int>(w_bytes);
  l.blocks = static_cast<int>((H + units - 1) / units);
  l.smem = static_cast<int>(w_bytes + rows * row_bytes(lanes_b));
  return true;
}

// Launches kernel(q) cooperatively on D x l.blocks blocks, or returns cudaErrorNotSupported
// (having launched nothing) when they cannot all be resident at once.
template <class Kernel, class Q>
cudaError_t launch(Kernel kernel, const Q& q, int D, const Layout& l, cudaStream_t stream) {
  int dev = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, l.smem);
  }
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                        static_cast<size_t>(l.smem));
  }
  if (err != cudaSuccess) return err;
  if (static_cast<int64_t>(per_sm) * sms < static_cast<int64_t>(l.blocks) * D) {
    return cudaErrorNotSupported;
  }
  void* args[] = {const_cast<Q*>(&q)};
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                    dim3(static_cast<unsigned>(l.blocks), static_cast<unsigned>(D)),
                                    dim3(kThreads), args, static_cast<size_t>(l.smem), stream);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // not sticky: the per-step path runs instead
    err = cudaErrorNotSupported;
  }
  return err;
}

// Neither kernel handles a projection, LayerNorm or per-step extras.
template <class Params>
bool plain_layer(const Params& p) {
  return p.w_hr == nullptr && !p.layer_norm() && p.resets == nullptr &&
         p.zoneout_h == nullptr && p.rec_mask == nullptr && p.T * p.B * p.H > 0;
}

}  // namespace

template <class T>
cudaError_t forward_persistent(CellKind kind, const ForwardParams<T>* p, int D,
                               acc_t<T>* ws_acc, T* ws, cudaStream_t stream) {
  using A = acc_t<T>;
  if (D < 1 || D > kMaxDirs) return cudaErrorInvalidValue;
  const int64_t B = p[0].B, H = p[0].H;
  const int G = gates_of(kind);
  PersistentForward<T> q;
  if (!plain_layer(p[0]) ||
      !plan(D, H, H, B, padded_gates(G) * static_cast<int64_t>(sizeof(T)), sizeof(A), q.l)) {
    return cudaErrorNotSupported;
  }
  for (int d = 0; d < D; ++d) q.p[d] = p[d];
  q.D = D;
  q.gh = ws_acc;
  q.c = ws_acc + D * B * G * H;
  q.hbuf = ws;
  const bool lstm = kind == CellKind::LSTM;
  cudaError_t err = cudaSuccess;
  for (int d = 0; lstm && d < D && err == cudaSuccess; ++d)
    err = convert(B * H, p[d].c0, q.c + d * B * H, stream);
  if (err != cudaSuccess) return err;
  with_cell(kind, [&](auto cell) {
    err = launch(persistent_kernel<decltype(cell), T, PersistentForward<T>>, q, D, q.l, stream);
  });
  for (int d = 0; lstm && d < D && err == cudaSuccess; ++d)
    err = convert(B * H, static_cast<const A*>(q.c + d * B * H), p[d].c_n, stream);
  return err;
}

template <class T>
cudaError_t backward_persistent(CellKind kind, const BackwardParams<T>* p, int D,
                                acc_t<T>* ws_acc, cudaStream_t stream) {
  using A = acc_t<T>;
  if (D < 1 || D > kMaxDirs) return cudaErrorInvalidValue;
  const int64_t B = p[0].B, H = p[0].H;
  const int G = gates_of(kind);
  PersistentBackward<T> q;
  if (!plain_layer(p[0]) || !plan(D, H, G * H, B, sizeof(T), sizeof(A), q.l)) {
    return cudaErrorNotSupported;
  }
  for (int d = 0; d < D; ++d) q.p[d] = p[d];
  q.D = D;
  q.dh = ws_acc;           // backward()'s workspace layout: dh [D, B, P], dc [D, B, H]
  q.dc = ws_acc + D * B * H;
  const bool lstm = kind == CellKind::LSTM;
  cudaError_t err = cudaSuccess;
  for (int d = 0; d < D && err == cudaSuccess; ++d) {
    err = p[d].dh_n ? convert(B * H, p[d].dh_n, q.dh + d * B * H, stream)
                    : cudaMemsetAsync(q.dh + d * B * H, 0, B * H * sizeof(A), stream);
    if (lstm && err == cudaSuccess) {
      err = p[d].dc_n ? convert(B * H, p[d].dc_n, q.dc + d * B * H, stream)
                      : cudaMemsetAsync(q.dc + d * B * H, 0, B * H * sizeof(A), stream);
    }
  }
  if (err != cudaSuccess) return err;
  with_cell(kind, [&](auto cell) {
    err = launch(persistent_kernel<decltype(cell), T, PersistentBackward<T>>, q, D, q.l, stream);
  });
  for (int d = 0; d < D && err == cudaSuccess; ++d) {
    err = convert(B * H, static_cast<const A*>(q.dh + d * B * H), p[d].dh0, stream);
    if (lstm && err == cudaSuccess)
      err = convert(B * H, static_cast<const A*>(q.dc + d * B * H), p[d].dc0, stream);
  }
  return err;
}

#define FASTRNN_INSTANTIATE(T)                                                           \
  template cudaError_t forward_persistent<T>(CellKind, const ForwardParams<T>*, int,     \
                                             acc_t<T>*, T*, cudaStream_t);               \
  template cudaError_t backward_persistent<T>(CellKind, const BackwardParams<T>*, int,   \
                                              acc_t<T>*, cudaStream_t);
FASTRNN_INSTANTIATE(float)
FASTRNN_INSTANTIATE(__half)
FASTRNN_INSTANTIATE(__nv_bfloat16)
#undef FASTRNN_INSTANTIATE

}  // namespace cuda
}  // namespace fastrnn
