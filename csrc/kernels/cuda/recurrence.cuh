// CUDA recurrence driver: runs the whole time loop of one layer and direction, forward or
// backward, for any cell of cells.h. Torch-free: plain CUDA runtime; the caller supplies the
// GEMM (cuBLAS in the op layer) and the stream.
//
// Scheme: a host loop over the steps. Each step is one GEMM for the recurrent part of the
// gate pre-activations (h W_hh^T forward, dgh W_hh backward) followed by one pointwise
// kernel over [B, H] that does the gate math of cells.h, the lengths masking and the state
// writes; an LSTM projection adds a GEMM and a small kernel over [B, P] per step.
// Everything runs in order on one stream, so a step's kernels see the previous step's
// writes without any synchronisation, and the host never waits on the device.
//
// Lengths are read by the kernels only (they may live in device memory) and are not
// range-checked: a row is valid at time t iff t < lengths[b], so a negative length acts as
// 0 and one above T acts as T.
//
// Precision: float and double compute in their own type. __half and __nv_bfloat16 store
// every tensor in that type but do the gate math, the recurrent GEMM's output, the cell
// state c and the running gradients dh, dc in float (acc_t), rounding only what is stored.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../cells.h"
#include "../params.h"

namespace fastrnn {
namespace cuda {

// ---- accumulation type ---------------------------------------------------------------

template <class T> struct AccOf { using type = T; };
template <> struct AccOf<__half> { using type = float; };
template <> struct AccOf<__nv_bfloat16> { using type = float; };
template <class T> using acc_t = typename AccOf<T>::type;

// ---- per-step kernel arguments ---------------------------------------------------------
// Pointers are already offset to this step's time slice; shapes are per step.

template <class T>
struct ForwardStep {
  int64_t B = 0, H = 0, P = 0;
  int64_t t = 0;                     // time index of the step (masking only)
  int64_t ldgx = 0, ldy = 0;         // row strides of gx (>= G*H) and y (>= P)
  const int64_t* lengths = nullptr;  // [B] or nullptr (all valid)
  const T* gx = nullptr;             // [B, ldgx] x W_ih^T + b_ih at time t (first G*H used)
  const acc_t<T>* gh = nullptr;      // [B, G*H] h W_hh^T (bias not yet added)
  const T* b_hh = nullptr;           // [G*H] or nullptr
  const T* hin = nullptr;            // [B, P] state entering the step
  T* hout = nullptr;                 // [B, P] state leaving it (no projection; else nullptr)
  T* y = nullptr;                    // [B, ldy] output at t (no projection; else nullptr)
  T* m = nullptr;                    // [B, H] output before projection (projection only)
  acc_t<T>* c = nullptr;             // [B, H] LSTM cell state, updated in place
  T* gates = nullptr;                // [B, S*H] saved cell values, or nullptr (inference)
  T* cprev = nullptr;                // [B, H] out: c entering the step (LSTM, saving)
  T* hin_copy = nullptr;             // [B, P] out: copy of hin (first step when saving)
};

// After the projection GEMM wrote hout = m W_hr^T for every row: padded rows take hin back,
// y gets hout on valid rows and zeros elsewhere.
template <class T>
struct ProjectStep {
  int64_t B = 0, P = 0, t = 0, ldy = 0;
  const int64_t* lengths = nullptr;
  const T* hin = nullptr;  // [B, P]
  T* hout = nullptr;       // [B, P]
  T* y = nullptr;          // [B, ldy]
};

template <class T>
struct BackwardStep {
  int64_t B = 0, H = 0, P = 0, t = 0;
  int64_t ldy = 0, ldg = 0;       // row strides of dy (>= P) and dgx/dgh (>= G*H)
  const int64_t* lengths = nullptr;
  const T* dy = nullptr;          // [B, ldy] dL/dy at t, or nullptr (none, or projection)
  const T* gates = nullptr;       // [B, S*H] saved cell values at t
  const T* hprev = nullptr;       // [B, P] state entering t
  const T* cprev = nullptr;       // [B, H] LSTM cell state entering t
  const acc_t<T>* dm = nullptr;   // [B, H] dL/d(output before projection) (projection only)
  acc_t<T>* dh = nullptr;         // [B, P] in: dL/dh after t; out: direct part of dL/dh_prev
                                  //   (projection: zeroed on valid rows); padded rows untouched
  acc_t<T>* dc = nullptr;         // [B, H] LSTM, in/out (new -> previous), padded rows untouched
  T* dgx = nullptr;               // [B, ldg] out (first G*H), zero on padded rows
  T* dgh = nullptr;               // [B, ldg] out (GRU only; other cells alias dgx)
};

// Projection, before the dm GEMM: dhtot = valid ? dh + dy : 0.
template <class T>
struct ProjectGradStep {
  int64_t B = 0, P = 0, t = 0, ldy = 0;
  const int64_t* lengths = nullptr;
  const T* dy = nullptr;          // [B, ldy] or nullptr
  const acc_t<T>* dh = nullptr;   // [B, P]
  T* dhtot = nullptr;             // [B, P] out
};

// ---- kernel launchers (pointwise.cu; instantiated for float, double, __half, bfloat16) --
// Each enqueues one kernel on `stream` and returns cudaGetLastError().

template <class T>
cudaError_t forward_step(CellKind kind, const ForwardStep<T>& a, cudaStream_t stream);
template <class T>
cudaError_t project_step(const ProjectStep<T>& a, cudaStream_t stream);
template <class T>
cudaError_t backward_step(CellKind kind, const BackwardStep<T>& a, cudaStream_t stream);
template <class T>
cudaError_t project_grad_step(const ProjectGradStep<T>& a, cudaStream_t stream);
// out[i] = in[i] converted, i < n. Instantiated for (T, acc_t<T>) and (acc_t<T>, T).
template <class In, class Out>
cudaError_t convert(int64_t n, const In* in, Out* out, cudaStream_t stream);

// ---- the driver ------------------------------------------------------------------------
// The caller provides the GEMM, enqueued on the same stream as the kernels:
//   gemm(M, N, K, A, lda, W, ldw, trans_w, accumulate, C, ldc)
//       C[M, N] = A[M, K] op(W) (+ C if accumulate), all row-major; op(W) = W^T when
//       trans_w (W is then [N, K] with leading dimension ldw), else W ([K, N]).
//       A and W are const T*; C is acc_t<T>* or T* (a template on C's element type);
//       products accumulate in acc_t<T> at least.

inline int64_t time_of(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// Workspace sizes, in elements of acc_t<T> and of T.
template <class T>
inline int64_t forward_workspace_acc(const ForwardParams<T>& p, int gates) {
  return p.B * gates * p.H + p.B * p.H;  // gh, c
}
template <class T>
inline int64_t forward_workspace(const ForwardParams<T>& p) {
  // Ping-pong state and the pre-projection output, when there is nowhere to save them.
  return p.saving() ? 0 : 2 * p.B * p.P + (p.w_hr ? p.B * p.H : 0);
}
template <class T>
inline int64_t backward_workspace_acc(const BackwardParams<T>& p) {
  return p.B * p.P + 2 * p.B * p.H;  // dh, dc, dm
}

#define FASTRNN_CUDA_TRY(expr)                  \
  do {                                          \
    const cudaError_t fastrnn_err_ = (expr);    \
    if (fastrnn_err_ != cudaSuccess) return fastrnn_err_; \
  } while (0)

// ws_acc: forward_workspace_acc elements; ws: forward_workspace elements.
template <class T, class Gemm>
cudaError_t forward(CellKind kind, const ForwardParams<T>& p, const Gemm& gemm, acc_t<T>* ws_acc,
                    T* ws, cudaStream_t stream) {
  using A = acc_t<T>;
  const int G = gates_of(kind), S = saved_of(kind);
  const bool lstm = kind == CellKind::LSTM;
  const int64_t Tn = p.T, B = p.B, H = p.H, P = p.P, GH = G * H;
  const bool proj = p.w_hr != nullptr, saving = p.saving();
  A* gh = ws_acc;      // [B, G*H]
  A* c = gh + B * GH;  // [B, H]
  T* hbuf = ws;        // [2, B, P] (inference)
  T* mbuf = ws + 2 * B * P;  // [B, H] (inference with projection)

  // State entering step s (s in [0, T]); step T's "entering" state is the final one.
  // When saving, the states live in hprev at their time slot, as on the CPU.
  auto state = [&](int64_t s) -> T* {
    if (s == Tn) return p.h_n;
    if (s == 0) return const_cast<T*>(p.h0);
    return saving ? p.hprev + time_of(s, Tn, p.reverse) * B * P : hbuf + (s % 2) * B * P;
  };

  if (lstm) FASTRNN_CUDA_TRY(convert(B * H, p.c0, c, stream));
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = time_of(s, Tn, p.reverse);
    const T* hin = state(s);
    T* hout = state(s + 1);
    gemm(B, GH, P, hin, P, p.w_hh, P, true, false, gh, GH);

    ForwardStep<T> a;
    a.B = B; a.H = H; a.P = P; a.t = t; a.lengths = p.lengths;
    a.ldgx = p.ldgx; a.ldy = p.ldy;
    a.gx = p.gx + t * B * p.ldgx;
    a.gh = gh;
    a.b_hh = p.b_hh;
    a.hin = hin;
    a.hout = proj ? nullptr : hout;
    a.y = proj ? nullptr : p.y + t * B * p.ldy;
    a.m = proj ? (saving ? p.m + t * B * H : mbuf) : nullptr;
    a.c = lstm ? c : nullptr;
    a.gates = saving ? p.gates + t * B * S * H : nullptr;
    a.cprev = saving && lstm ? p.cprev + t * B * H : nullptr;
    a.hin_copy = saving && s == 0 ? p.hprev + t * B * P : nullptr;
    FASTRNN_CUDA_TRY(forward_step(kind, a, stream));

    if (proj) {  // h = m W_hr^T, then the masking of the projected state
      gemm(B, P, H, static_cast<const T*>(a.m), H, p.w_hr, H, true, false, hout, P);
      ProjectStep<T> q;
      q.B = B; q.P = P; q.t = t; q.ldy = p.ldy; q.lengths = p.lengths;
      q.hin = hin; q.hout = hout; q.y = p.y + t * B * p.ldy;
      FASTRNN_CUDA_TRY(project_step(q, stream));
    }
  }
  if (lstm) FASTRNN_CUDA_TRY(convert(B * H, static_cast<const A*>(c), p.c_n, stream));
  return cudaSuccess;
}

// ws_acc: backward_workspace_acc elements.
template <class T, class Gemm>
cudaError_t backward(CellKind kind, const BackwardParams<T>& p, const Gemm& gemm,
                     acc_t<T>* ws_acc, cudaStream_t stream) {
  using A = acc_t<T>;
  const int G = gates_of(kind), S = saved_of(kind);
  const bool lstm = kind == CellKind::LSTM;
  const int64_t Tn = p.T, B = p.B, H = p.H, P = p.P, GH = G * H;
  const bool proj = p.w_hr != nullptr;
  A* dh = ws_acc;      // [B, P]
  A* dc = dh + B * P;  // [B, H]
  A* dm = dc + B * H;  // [B, H]

  // Running gradients start at dh_n, dc_n (zero when absent).
  if (p.dh_n)
    FASTRNN_CUDA_TRY(convert(B * P, p.dh_n, dh, stream));
  else
    FASTRNN_CUDA_TRY(cudaMemsetAsync(dh, 0, B * P * sizeof(A), stream));
  if (lstm && p.dc_n)
    FASTRNN_CUDA_TRY(convert(B * H, p.dc_n, dc, stream));
  else if (lstm)
    FASTRNN_CUDA_TRY(cudaMemsetAsync(dc, 0, B * H * sizeof(A), stream));
  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t t = time_of(s, Tn, p.reverse);
    const T* dy = p.dy ? p.dy + t * B * p.ldy : nullptr;
    if (proj) {  // dm = (dh + dy) W_hr on valid rows
      ProjectGradStep<T> q;
      q.B = B; q.P = P; q.t = t; q.ldy = p.ldy; q.lengths = p.lengths;
      q.dy = dy; q.dh = dh; q.dhtot = p.dhtot + t * B * P;
      FASTRNN_CUDA_TRY(project_grad_step(q, stream));
      gemm(B, H, P, static_cast<const T*>(q.dhtot), P, p.w_hr, H, false, false, dm, H);
    }

    BackwardStep<T> a;
    a.B = B; a.H = H; a.P = P; a.t = t; a.lengths = p.lengths;
    a.ldy = p.ldy; a.ldg = p.ldg;
    a.dy = proj ? nullptr : dy;
    a.gates = p.gates + t * B * S * H;
    a.hprev = p.hprev + t * B * P;
    a.cprev = lstm ? p.cprev + t * B * H : nullptr;
    a.dm = proj ? dm : nullptr;
    a.dh = dh;
    a.dc = lstm ? dc : nullptr;
    a.dgx = p.dgx + t * B * p.ldg;
    a.dgh = p.dgh + t * B * p.ldg;
    FASTRNN_CUDA_TRY(backward_step(kind, a, stream));

    // dh_prev = direct part + dgh W_hh. Padded rows have dgh = 0 and keep dh unchanged.
    gemm(B, P, GH, static_cast<const T*>(a.dgh), p.ldg, p.w_hh, P, false, true, dh, P);
  }
  FASTRNN_CUDA_TRY(convert(B * P, static_cast<const A*>(dh), p.dh0, stream));
  if (lstm) FASTRNN_CUDA_TRY(convert(B * H, static_cast<const A*>(dc), p.dc0, stream));
  return cudaSuccess;
}

#undef FASTRNN_CUDA_TRY

}  // namespace cuda
}  // namespace fastrnn
