// Per-step kernels of the LayerNorm cells (cells.h: LnLstm, LnGru) for the CUDA recurrence
// (recurrence.cuh): one block per (direction, batch row). Normalising needs the statistics
// of a row's whole recurrent gate vector (G*H values; LnLstm also those of its H cell
// values), so the block reduces them between passes over the row's units. Each thread keeps
// the same units (j = threadIdx.x, threadIdx.x + blockDim.x, ...) in every pass, so what a
// pass leaves in a workspace for a later one is read back by the thread that wrote it. The
// cell math is cells.h's; lengths masking, resets, zoneout and recurrent dropout are the
// plain per-step path's (units.cuh).
//
// Statistics: two passes, the mean and then the squared deviations from it, in acc_t (float
// for __half and __nv_bfloat16, double for double), each summed in a fixed order, so every
// run gives the same bits. Torch-free; explicitly instantiated below for every dtype.
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

using namespace unit;  // load, store, zero, valid, reset_row, leave_state, carry_state

constexpr int kRowThreads = 256;  // threads per block at most (a row of H units)
constexpr int kRowWarps = kRowThreads / 32;
constexpr int64_t kMaxRowBlocks = 1 << 20;  // grid cap; each block then loops over rows

// Threads for rows of H units: whole warps, no more than the units need.
inline unsigned row_threads(int64_t H) {
  return static_cast<unsigned>(std::min<int64_t>(kRowThreads, std::max<int64_t>(1, (H + 31) / 32) * 32));
}

// v[k] summed over the block's threads, k < N, returned to every thread. Each warp sums by
// shuffles; then every thread adds the warps' sums, red [N, kRowWarps] in shared memory, in
// warp order, so all threads get the same bits. Returns past a barrier: red is free again.
// Every thread of the block must call it.
template <int N, class A>
__device__ __forceinline__ void block_sum(A (&v)[N], A* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    if (lane == 0) red[k * kRowWarps + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    A s = A(0);
    for (int w = 0; w < warps; ++w) s += red[k * kRowWarps + w];
    v[k] = s;
  }
  __syncthreads();
}

// Mean and 1 / sqrt(variance + eps) (the biased variance, as torch's layer_norm) of the n
// values v [n], by the whole block. Threads read v with the units' stride (see above).
template <class A>
__device__ __forceinline__ void row_stats(const A* v, int64_t n, A eps, A* red, A& mean,
                                          A& rstd) {
  A s[1] = {A(0)};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s[0] += v[i];
  block_sum(s, red);
  mean = s[0] / static_cast<A>(n);
  s[0] = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const A d = v[i] - mean;
    s[0] += d * d;
  }
  block_sum(s, red);
  rstd = A(1) / sqrt(s[0] / static_cast<A>(n) + eps);
}

// ---- forward ----------------------------------------------------------------------------
// Row b of one direction: statistics of h W_hh^T (gh), the normalised recurrent parts and
// the cell math (LnGru: the new h; LnLstm: the new c, whose statistics then give h).
template <class Cell, class T>
__device__ __forceinline__ void ln_forward_row(const LnForwardStep<T>& s,
                                               const ForwardStepDir<T>& a,
                                               const LnForwardDir<T>& l, int64_t b,
                                               acc_t<T>* red) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  const ForwardStep<T>& f = s.step;
  const int64_t H = f.H, GH = G * H;  // no projection: P == H
  T* const y = a.y + b * f.ldy;
  T* const save = a.gates != nullptr ? a.gates + b * S * H : nullptr;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {  // what backward reads
    const int64_t idx = b * H + j;
    if (a.hin_copy != nullptr) a.hin_copy[idx] = a.hin[idx];
    if (Cell::kHasCell && a.cprev != nullptr) a.cprev[idx] = store<T>(a.c[idx]);
  }
  if (!valid(f.lengths, b, a.t)) {  // padded: the state passes through, outputs are zero
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      if (save != nullptr) {  // never read by backward; kept defined
#pragma unroll
        for (int k = 0; k < S; ++k) save[k * H + j] = zero<T>();
      }
      carry_state(a.x, H, b, j, a.hin, a.hout, y + j);
    }
    if (l.rstd != nullptr && threadIdx.x == 0) l.rstd[2 * b] = l.rstd[2 * b + 1] = zero<T>();
    return;
  }

  const A* raw = a.gh + b * GH;  // h W_hh^T (h * rec_mask with recurrent dropout), no bias
  A mean, rstd;
  row_stats(raw, GH, s.eps, red, mean, rstd);
  if (l.rstd != nullptr && threadIdx.x == 0) {
    l.rstd[2 * b] = store<T>(rstd);
    if (!Cell::kHasCell) l.rstd[2 * b + 1] = zero<T>();
  }
  const T* gx = a.gx + b * f.ldgx;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const int64_t idx = b * H + j;
    A xg[G], hg[G], sv[Cell::kCellSaved], h = A(0), c = A(0);
#pragma unroll
    for (int k = 0; k < G; ++k) {
      const int64_t q = k * H + j;
      const A norm = (raw[q] - mean) * rstd;
      if (save != nullptr) save[q] = store<T>(norm);
      hg[k] = norm * load(l.ln_w[q]) + load(l.ln_b[q]) +
              (a.b_hh != nullptr ? load(a.b_hh[q]) : A(0));
      xg[k] = load(gx[q]) * load(l.gx_w[q]) + load(l.gx_b[q]);
    }
    if constexpr (Cell::kHasCell) {  // c now; h once c's statistics are known
      Cell::state(xg, hg, a.c[idx], c, sv);
      l.stash[b * 2 * H + j] = c;
      l.stash[b * 2 * H + H + j] = sv[3];  // o
    } else {
      Cell::forward(xg, hg, load(a.hin[idx]), A(0), h, c, sv);
      leave_state(a.x, f.lengths, f.B, H, b, j, h, a.hin, a.hout, y + j);
    }
  }

  if constexpr (Cell::kHasCell) {  // h = o * tanh(lnc_w * norm(c) + lnc_b)
    const A* cnew = l.stash + b * 2 * H;
    const A* o = cnew + H;
    A mean_c, rstd_c;
    row_stats(cnew, H, s.eps, red, mean_c, rstd_c);
    if (l.rstd != nullptr && threadIdx.x == 0) l.rstd[2 * b + 1] = store<T>(rstd_c);
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const int64_t idx = b * H + j;
      const A cn = (cnew[j] - mean_c) * rstd_c;
      if (save != nullptr) save[Cell::kNormC * H + j] = store<T>(cn);
      const A h = Cell::output(o[j], cn, load(l.lnc_w[j]), load(l.lnc_b[j]));
      A c = cnew[j];
      if (a.x.zoneout_c != nullptr) {
        const A z = load(a.x.zoneout_c[idx]);
        c = z * a.c[idx] + (A(1) - z) * c;
      }
      a.c[idx] = reset_row(a.x, f.lengths, f.B, b) ? load(a.x.c0[idx]) : c;
      leave_state(a.x, f.lengths, f.B, H, b, j, h, a.hin, a.hout, y + j);
    }
  }
}

// ---- backward ---------------------------------------------------------------------------
// Row b of one direction: the cell's gate gradients (LnLstm: through LN_c first), then
// LN_hh's backward, to draw (and the packed copy dg) for the recurrent GEMM that follows.
template <class Cell, class T>
__device__ __forceinline__ void ln_backward_row(const LnBackwardStep<T>& s,
                                                const BackwardStepDir<T>& a,
                                                const LnBackwardDir<T>& l, int64_t b,
                                                acc_t<T>* red) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  const BackwardStep<T>& st = s.step;
  const int64_t H = st.H, GH = G * H;  // no projection: P == H
  T* const dgx = a.dgx + b * st.ldg;
  T* const dgh = a.dgh + b * st.ldg;
  T* const draw = l.draw + b * st.ldg;
  T* const dg = a.dg != nullptr ? a.dg + b * GH : nullptr;
  if (!valid(st.lengths, b, a.t)) {  // padded: no gradient; dh and dc pass through
    for (int64_t q = threadIdx.x; q < GH; q += blockDim.x) {
      dgx[q] = zero<T>();
      if (Cell::kSplitGrad) dgh[q] = zero<T>();
      draw[q] = zero<T>();
      if (dg != nullptr) dg[q] = zero<T>();
    }
    if (Cell::kHasCell)
      for (int64_t j = threadIdx.x; j < H; j += blockDim.x) l.dlnc[b * H + j] = zero<T>();
    return;
  }

  const T* norm = a.gates + b * S * H;  // saved: norm(h W_hh^T) [G*H], LnLstm's norm(c) [H]
  const T* gx = l.gx + b * s.ldgx;
  A* const dgate = l.dgate + b * GH;
  // The cell's values of unit j (cells.h), recomputed as forward computed them: from the
  // input parts and the saved norms.
  auto cell_values = [&](int64_t j, A(&sv)[Cell::kCellSaved]) {
    A xg[G], hg[G], h = A(0), c = A(0);
#pragma unroll
    for (int k = 0; k < G; ++k) {
      const int64_t q = k * H + j;
      xg[k] = load(gx[q]) * load(l.gx_w[q]) + load(l.gx_b[q]);
      hg[k] = load(norm[q]) * load(l.ln_w[q]) + load(l.ln_b[q]) +
              (l.b_hh != nullptr ? load(l.b_hh[q]) : A(0));
    }
    if constexpr (Cell::kHasCell)
      Cell::state(xg, hg, A(0), c, sv);  // the gates do not depend on c
    else
      Cell::forward(xg, hg, load(a.hprev[b * H + j]), A(0), h, c, sv);
  };
  // The gradient reaching unit j's new h, dh + dy: zoneout sends z of it straight to the
  // state entering the step (dzh) and the rest through the cell (dout).
  auto output_grad = [&](int64_t j, A& dout, A& dzh) {
    dout = a.dh[b * H + j] + (a.dy != nullptr ? load(a.dy[b * st.ldy + j]) : A(0));
    dzh = A(0);
    if (a.x.zoneout_h != nullptr) {
      const A z = load(a.x.zoneout_h[b * H + j]);
      dzh = z * dout;
      dout *= A(1) - z;
    }
  };
  // LN_hh's backward needs the row's sums of ln_w * dgh and of ln_w * dgh * norm.
  A sums[2] = {A(0), A(0)};
  auto add_sums = [&](int64_t j) {
#pragma unroll
    for (int k = 0; k < G; ++k) {
      const int64_t q = k * H + j;
      const A w_dg = load(l.ln_w[q]) * dgate[q];
      sums[0] += w_dg;
      sums[1] += w_dg * load(norm[q]);
    }
  };

  if constexpr (Cell::kHasCell) {
    // h = o * tanh(u), u = lnc_w * norm(c) + lnc_b: first o's and u's gradients, and the
    // sums of LN_c's backward.
    A csums[2] = {A(0), A(0)};
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      A sv[Cell::kCellSaved], dout, dzh, dgo, du;
      cell_values(j, sv);
      output_grad(j, dout, dzh);
      const A cn = load(norm[Cell::kNormC * H + j]), w = load(l.lnc_w[j]);
      Cell::output_backward(sv[3], cn, w, load(l.lnc_b[j]), dout, dgo, du);
      // i, f, g wait in their gradients' places for the second pass.
      dgate[j] = sv[0];
      dgate[H + j] = sv[1];
      dgate[2 * H + j] = sv[2];
      dgate[3 * H + j] = dgo;
      l.du[b * H + j] = du;
      l.dlnc[b * H + j] = store<T>(du);
      csums[0] += w * du;
      csums[1] += w * du * cn;
    }
    block_sum(csums, red);
    const A mean0 = csums[0] / static_cast<A>(H), mean1 = csums[1] / static_cast<A>(H);
    const A rstd_c = load(l.rstd[2 * b + 1]);
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const int64_t idx = b * H + j;
      A dcv = a.dc[idx], dzc = A(0);
      if (a.x.zoneout_c != nullptr) {  // c = z c_prev + (1 - z) c_cell
        const A z = load(a.x.zoneout_c[idx]);
        dzc = z * dcv;
        dcv *= A(1) - z;
      }
      // The total gradient w.r.t. the new c: the carried one plus LN_c's input gradient.
      const A cn = load(norm[Cell::kNormC * H + j]);
      const A dct = dcv + rstd_c * (load(l.lnc_w[j]) * l.du[idx] - mean0 - cn * mean1);
      const A sv[3] = {dgate[j], dgate[H + j], dgate[2 * H + j]};
      A d[3];
      Cell::state_backward(sv, load(a.cprev[idx]), dct, d, dcv);
#pragma unroll
      for (int k = 0; k < 3; ++k) dgate[k * H + j] = d[k];
#pragma unroll
      for (int k = 0; k < G; ++k) dgx[k * H + j] = store<T>(dgate[k * H + j]);  // dgh == dgx
      a.dc[idx] = dcv + dzc;
      A dout, dzh;
      output_grad(j, dout, dzh);
      a.dh[idx] = dzh;  // no direct part: only W_hh's, which the GEMM adds, reaches h_prev
      add_sums(j);
    }
  } else {
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      A sv[Cell::kCellSaved], gxv[G], ghv[G], dout, dzh, dhp = A(0), dcv = A(0);
      cell_values(j, sv);
      output_grad(j, dout, dzh);
      Cell::backward(sv, load(a.hprev[b * H + j]), A(0), dout, dcv, gxv, ghv, dhp);
#pragma unroll
      for (int k = 0; k < G; ++k) {
        dgx[k * H + j] = store<T>(gxv[k]);
        dgh[k * H + j] = store<T>(ghv[k]);
        dgate[k * H + j] = ghv[k];
      }
      a.dh[b * H + j] = dhp + dzh;  // the direct part; the GEMM adds W_hh's
      add_sums(j);
    }
  }

  // LN_hh's input gradient, rstd * (ln_w * dgh - mean0 - norm * mean1).
  block_sum(sums, red);
  const A mean0 = sums[0] / static_cast<A>(GH), mean1 = sums[1] / static_cast<A>(GH);
  const A rstd = load(l.rstd[2 * b]);
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
#pragma unroll
    for (int k = 0; k < G; ++k) {
      const int64_t q = k * H + j;
      const T v = store<T>(rstd * (load(l.ln_w[q]) * dgate[q] - mean0 - load(norm[q]) * mean1));
      draw[q] = v;
      if (dg != nullptr) dg[q] = v;
    }
  }
}

// ---- kernels ----------------------------------------------------------------------------
// Grid (row blocks, directions); each block runs rows b = blockIdx.x, + gridDim.x, ... of
// direction blockIdx.y. Each branch hands its direction's arguments to the inlined body
// with a constant index, so they are read straight from the parameter bank.

template <class Cell, class T>
__global__ void __launch_bounds__(kRowThreads) ln_forward_kernel(const LnForwardStep<T> s) {
  __shared__ acc_t<T> red[kRowWarps];
  for (int64_t b = blockIdx.x; b < s.step.B; b += gridDim.x) {
    if (blockIdx.y == 0)
      ln_forward_row<Cell>(s, s.step.dir[0], s.ln[0], b, red);
    else
      ln_forward_row<Cell>(s, s.step.dir[1], s.ln[1], b, red);
  }
}

template <class Cell, class T>
__global__ void __launch_bounds__(kRowThreads) ln_backward_kernel(const LnBackwardStep<T> s) {
  __shared__ acc_t<T> red[2 * kRowWarps];
  for (int64_t b = blockIdx.x; b < s.step.B; b += gridDim.x) {
    if (blockIdx.y == 0)
      ln_backward_row<Cell>(s, s.step.dir[0], s.ln[0], b, red);
    else
      ln_backward_row<Cell>(s, s.step.dir[1], s.ln[1], b, red);
  }
}

inline dim3 row_grid(int64_t B, int D) {
  return dim3(static_cast<unsigned>(std::min(B, kMaxRowBlocks)), static_cast<unsigned>(D));
}

}  // namespace

template <class T>
cudaError_t ln_forward_step(CellKind kind, const LnForwardStep<T>& a, cudaStream_t stream) {
  const ForwardStep<T>& f = a.step;
  if (f.D < 1 || f.D > kMaxDirs) return cudaErrorInvalidValue;
  if (f.B == 0 || f.H == 0) return cudaSuccess;
  const dim3 grid = row_grid(f.B, f.D);
  if (kind == CellKind::LSTM)
    ln_forward_kernel<LnLstm, T><<<grid, row_threads(f.H), 0, stream>>>(a);
  else if (kind == CellKind::GRU)
    ln_forward_kernel<LnGru, T><<<grid, row_threads(f.H), 0, stream>>>(a);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

template <class T>
cudaError_t ln_backward_step(CellKind kind, const LnBackwardStep<T>& a, cudaStream_t stream) {
  const BackwardStep<T>& st = a.step;
  if (st.D < 1 || st.D > kMaxDirs) return cudaErrorInvalidValue;
  if (st.B == 0 || st.H == 0) return cudaSuccess;
  const dim3 grid = row_grid(st.B, st.D);
  if (kind == CellKind::LSTM)
    ln_backward_kernel<LnLstm, T><<<grid, row_threads(st.H), 0, stream>>>(a);
  else if (kind == CellKind::GRU)
    ln_backward_kernel<LnGru, T><<<grid, row_threads(st.H), 0, stream>>>(a);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

#define FASTRNN_INSTANTIATE(T)                                                                \
  template cudaError_t ln_forward_step<T>(CellKind, const LnForwardStep<T>&, cudaStream_t);   \
  template cudaError_t ln_backward_step<T>(CellKind, const LnBackwardStep<T>&, cudaStream_t);
FASTRNN_INSTANTIATE(float)
FASTRNN_INSTANTIATE(double)
FASTRNN_INSTANTIATE(__half)
FASTRNN_INSTANTIATE(__nv_bfloat16)
#undef FASTRNN_INSTANTIATE

}  // namespace cuda
}  // namespace fastrnn
