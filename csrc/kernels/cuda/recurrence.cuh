// CUDA recurrence driver: runs the whole time loop of one layer, all its directions (one or
// two) together, forward or backward, for any cell of cells.h. Torch-free: plain CUDA
// runtime; the caller supplies the GEMM (ATen's batched GEMM in the op layer) and the stream.
//
// Scheme: a host loop over the steps. Each step is one GEMM for the recurrent part of the
// gate pre-activations (h W_hh^T forward, dgh W_hh backward), batched over the directions
// (a strided-batched GEMM with one matrix per direction), followed by one pointwise kernel
// over [D, B, H] that does the gate math of cells.h, the lengths masking and the state
// writes of every direction; an LSTM projection adds one more batched GEMM and one small
// kernel over [D, B, P] per step. The LayerNorm cells (cells.h: LnLstm, LnGru) run the same
// loop with a kernel of one block per (direction, batch row) in place of the pointwise one
// (layer_norm.cu), since normalising needs the statistics of a whole row; their recurrent
// GEMM backward multiplies W_hh by the LayerNorm's input gradient instead of dgh.
// Direction d's step s is at time s, or T-1-s when it runs reversed, so the two directions
// of a bidirectional layer advance together from opposite ends. Everything runs in order on
// one stream, so a step's kernels see the previous step's writes without any
// synchronisation, and the host never waits on the device.
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

// A layer has one or two directions.
constexpr int kMaxDirs = 2;

// ---- per-step kernel arguments ---------------------------------------------------------

// Resets, zoneout and recurrent dropout of one direction at one step (params.h has their
// semantics); every pointer nullptr when unused.
//   forward: the state leaving a valid row's step is z * (state entering) + (1 - z) * (new
//   value), y takes it, and hrec gets (state leaving) * rec_mask for the next step's GEMM;
//   a row whose next step starts an episode then takes h0/c0 as the state leaving.
//   backward: the gradient reaching the state leaving a valid row's step splits into z *
//   (direct to the state entering) and (1 - z) * (through the cell); the recurrent product's
//   gradient is multiplied by rec_mask; at a reset the gradient of the state entering goes
//   to dh0/dc0 (gathered in dh0acc/dc0acc) instead of the step before.
template <class T>
struct Extras {
  const uint8_t* resets = nullptr;   // [T, B] episode starts (bytes), or nullptr
  int64_t steps = 0;                 // T (resets)
  bool reverse = false;              // the direction's walk (resets)
  int64_t t_reset = -1;              // forward: time of the next step (-1: none); backward:
                                     //   this step's
  const T* h0 = nullptr;             // [B, P] forward: the state taken at a reset
  const T* c0 = nullptr;             // [B, H] forward, LSTM
  const T* zoneout_h = nullptr;      // [B, P] at this step's time
  const T* zoneout_c = nullptr;      // [B, H] at this step's time (LSTM)
  const T* rec_mask = nullptr;       // [B, P]
  T* hrec = nullptr;                 // [B, P] forward out: state leaving * rec_mask
  acc_t<T>* dz = nullptr;            // [B, P] backward, projection: the zoneout part of dh
  acc_t<T>* drec = nullptr;          // [B, P] backward: dgh W_hh, before the mask
  acc_t<T>* dh0acc = nullptr;        // [B, P] backward: gradients gathered at resets
  acc_t<T>* dc0acc = nullptr;        // [B, H] backward, LSTM
};
// One launch covers the same step s of every direction: the shapes and lengths are shared;
// each direction has its own time index and pointers, already offset to its time slice
// (and to its own [B, ...] slice of the workspaces). The kernels run one grid row
// (blockIdx.y) per direction.

template <class T>
struct ForwardStepDir {
  int64_t t = 0;                     // time index of this direction's step (masking only)
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
  Extras<T> x;                       // resets, zoneout, recurrent dropout (see Extras)
};

template <class T>
struct ForwardStep {
  int D = 1;                         // directions in the launch (grid rows)
  int64_t B = 0, H = 0, P = 0;
  int64_t ldgx = 0, ldy = 0;         // row strides of gx (>= G*H) and y (>= P)
  const int64_t* lengths = nullptr;  // [B] or nullptr (all valid)
  ForwardStepDir<T> dir[kMaxDirs];
};

// After the projection GEMM wrote hout = m W_hr^T for every row: padded rows take hin back,
// y gets hout on valid rows and zeros elsewhere.
template <class T>
struct ProjectStepDir {
  int64_t t = 0;
  const T* hin = nullptr;  // [B, P]
  T* hout = nullptr;       // [B, P]
  T* y = nullptr;          // [B, ldy]
  Extras<T> x;             // the state leaving the step is finished here (see Extras)
};

template <class T>
struct ProjectStep {
  int D = 1;
  int64_t B = 0, P = 0, ldy = 0;
  const int64_t* lengths = nullptr;  // [B] or nullptr
  ProjectStepDir<T> dir[kMaxDirs];
};

template <class T>
struct BackwardStepDir {
  int64_t t = 0;
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
  T* dg = nullptr;                // [B, G*H] out: the recurrent part (dgh) again, packed for
                                  //   the batched dh GEMM, or nullptr (one direction)
  Extras<T> x;                    // see Extras
};

template <class T>
struct BackwardStep {
  int D = 1;
  int64_t B = 0, H = 0, P = 0;
  int64_t ldy = 0, ldg = 0;       // row strides of dy (>= P) and dgx/dgh (>= G*H)
  const int64_t* lengths = nullptr;
  BackwardStepDir<T> dir[kMaxDirs];
};

// Projection, before the dm GEMM: dhtot = valid ? dh + dy : 0.
template <class T>
struct ProjectGradStepDir {
  int64_t t = 0;
  const T* dy = nullptr;          // [B, ldy] or nullptr
  const acc_t<T>* dh = nullptr;   // [B, P]
  T* dhtot = nullptr;             // [B, P] out
  Extras<T> x;                    // zoneout: dhtot takes the cell's part, x.dz the rest
};

template <class T>
struct ProjectGradStep {
  int D = 1;
  int64_t B = 0, P = 0, ldy = 0;
  const int64_t* lengths = nullptr;
  ProjectGradStepDir<T> dir[kMaxDirs];
};

// LayerNorm cells (cells.h: LnLstm, LnGru; never a projection, so P == H). A step takes the
// plain step's arguments and these per direction (params.h has the LayerNorm fields). Its
// kernel runs one block per (direction, batch row): the normalisation needs statistics of
// the row's whole gate vector. The plain step's gh is then the raw h W_hh^T, and the saved
// `gates` hold the norms (cells.h): norm(h W_hh^T) [G*H], then LnLstm's norm(c) [H].
template <class T>
struct LnForwardDir {
  const T* ln_w = nullptr;       // [G*H] LN_hh's weight
  const T* ln_b = nullptr;       // [G*H] LN_hh's bias
  const T* gx_w = nullptr;       // [G*H] LN_ih's weight: the input parts are gx * gx_w + gx_b
  const T* gx_b = nullptr;       // [G*H] LN_ih's bias (plus the input bias)
  const T* lnc_w = nullptr;      // [H] LN_c's weight (LnLstm), else nullptr
  const T* lnc_b = nullptr;      // [H] LN_c's bias (LnLstm)
  T* rstd = nullptr;             // [B, 2] out at the step's time: 1/sqrt(var + eps) of the
                                 //   recurrent gate vector, and of c (LnLstm; else 0); 0 on
                                 //   padded rows; nullptr when not saving
  acc_t<T>* stash = nullptr;     // [B, 2, H] workspace (LnLstm): the new c before zoneout,
                                 //   then the activated o, kept between the kernel's passes
};

template <class T>
struct LnForwardStep {
  ForwardStep<T> step;           // the plain step's arguments
  acc_t<T> eps = 0;              // LayerNorm's epsilon
  LnForwardDir<T> ln[kMaxDirs];
};

template <class T>
struct LnBackwardDir {
  const T* gx = nullptr;         // [B, ldgx] the normalised input projections at t
  const T* gx_w = nullptr;       // [G*H] as in LnForwardDir
  const T* gx_b = nullptr;       // [G*H]
  const T* ln_w = nullptr;       // [G*H]
  const T* ln_b = nullptr;       // [G*H]
  const T* b_hh = nullptr;       // [G*H] or nullptr
  const T* lnc_w = nullptr;      // [H] LnLstm, else nullptr
  const T* lnc_b = nullptr;      // [H] LnLstm
  const T* rstd = nullptr;       // [B, 2] saved by forward at t
  T* draw = nullptr;             // [B, ldg] out (first G*H): d(h W_hh^T), the LayerNorm's input;
                                 //   zero on padded rows. The step's `dg` (two directions)
                                 //   receives it packed, for the recurrent GEMM.
  T* dlnc = nullptr;             // [B, H] out (LnLstm): d(lnc_w * norm(c) + lnc_b); zero on
                                 //   padded rows
  acc_t<T>* dgate = nullptr;     // [B, G*H] workspace: the recurrent parts' gradient (dgh)
                                 //   between the kernel's passes
  acc_t<T>* du = nullptr;        // [B, H] workspace (LnLstm): dlnc before rounding
};

template <class T>
struct LnBackwardStep {
  BackwardStep<T> step;          // the plain step's arguments (dgh: w.r.t. LN_hh's output)
  int64_t ldgx = 0;              // row stride of gx (>= G*H)
  LnBackwardDir<T> ln[kMaxDirs];
};

// fn(Cell{}) with the cells.h type of `kind` (host side: picks a kernel's template).
template <class Fn>
inline void with_cell(CellKind kind, Fn&& fn) {
  switch (kind) {
    case CellKind::LSTM: fn(Lstm{}); break;
    case CellKind::GRU: fn(Gru{}); break;
    case CellKind::RNN_TANH: fn(Rnn<false>{}); break;
    case CellKind::RNN_RELU: fn(Rnn<true>{}); break;
  }
}

// ---- kernel launchers (pointwise.cu; instantiated for float, double, __half, bfloat16) --
// Each enqueues one kernel, covering all a.D directions, on `stream` and returns
// cudaGetLastError().

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
// out[i] = a[i] * b[i], i < n (the first step's h * rec_mask).
template <class T>
cudaError_t multiply(int64_t n, const T* a, const T* b, T* out, cudaStream_t stream);
// out[i] += in[i], i < n (dh0/dc0: the gradient reaching the first step plus the resets').
template <class A>
cudaError_t accumulate(int64_t n, const A* in, A* out, cudaStream_t stream);
// After a backward step's recurrent GEMM, on the valid rows: dh += drec * rec_mask, then a
// reset's gradients to dh0acc/dc0acc (see Extras). Only when a direction has either.
template <class T>
cudaError_t backward_tail_step(const BackwardStep<T>& a, cudaStream_t stream);
// LayerNorm cells (kind LSTM: LnLstm, GRU: LnGru; layer_norm.cu): the step's gate math after
// the recurrent GEMM, as forward_step and backward_step do for the plain cells. The backward
// leaves dh as backward_step does (the direct part, before the GEMM adds draw W_hh).
template <class T>
cudaError_t ln_forward_step(CellKind kind, const LnForwardStep<T>& a, cudaStream_t stream);
template <class T>
cudaError_t ln_backward_step(CellKind kind, const LnBackwardStep<T>& a, cudaStream_t stream);

// The whole forward, or the recurrent part of the whole backward, of a layer without
// projection in one cooperative launch, with each block's slice of W_hh in shared memory for
// the whole sequence (persistent.cu; T is float, __half or __nv_bfloat16). Same arguments and
// workspaces as forward() and backward() below (the backward needs no T workspace), same
// results up to the summation order of the recurrent products (FP32 FMA, never TF32).
// Return cudaErrorNotSupported, having changed no output, where they do not apply: a
// projection, LayerNorm or per-step extras (resets, zoneout, recurrent dropout), a W_hh slice
// too large for shared memory, or a grid that cannot be co-resident; the caller then runs
// forward() or backward().
template <class T>
cudaError_t forward_persistent(CellKind kind, const ForwardParams<T>* p, int D,
                               acc_t<T>* ws_acc, T* ws, cudaStream_t stream);
template <class T>
cudaError_t backward_persistent(CellKind kind, const BackwardParams<T>* p, int D,
                                acc_t<T>* ws_acc, cudaStream_t stream);

// ---- the driver ------------------------------------------------------------------------
// The caller provides the GEMM, batched over the directions and enqueued on the same stream
// as the kernels:
//   gemm(D, M, N, K, A, lda, sa, W, ldw, sw, trans_w, accumulate, C, ldc, sc)
//       for d < D: C_d[M, N] = A_d[M, K] op(W_d) (+ C_d if accumulate), all row-major, with
//       A_d = A + d * sa, W_d = W + d * sw, C_d = C + d * sc (batch strides in elements,
//       >= 0; unused when D == 1); op(W) = W^T when trans_w (W_d is then [N, K] with
//       leading dimension ldw), else W_d ([K, N]).
//       A and W are const T*; C is acc_t<T>* or T* (a template on C's element type);
//       products accumulate in acc_t<T> at least.
//
// p[0 .. D-1] describe the directions: the same T, B, H, P, ldgx/ldy/ldg and lengths, each
// with its own pointers and `reverse`. Every per-direction array the GEMMs read or write is
// one of a [D, ...] stack, so direction 1's pointer lies at a fixed distance after direction
// 0's (the batch stride): weights [D, ...], h0/h_n [D, B, P], the saved [D, T, B, ...]
// tensors and the workspaces. (The side-by-side rows of dgx/dgh are not: their two slices
// of one step can lie in either order, so the backward packs them into a workspace.)

__host__ __device__ inline int64_t time_of(int64_t s, int64_t T, bool reverse) {
  return reverse ? T - 1 - s : s;
}

// Direction d's state entering step s (s in [0, T]); step T's "entering" state is the final
// one. When saving, the states live in hprev at their time slot, as on the CPU; otherwise in
// the ping-pong buffer hbuf [D, 2, B, P].
template <class T>
__host__ __device__ inline T* step_state(const ForwardParams<T>& q, int d, int64_t s, T* hbuf) {
  if (s == q.T) return q.h_n;
  if (s == 0) return const_cast<T*>(q.h0);
  return q.gates != nullptr ? q.hprev + time_of(s, q.T, q.reverse) * q.B * q.P
                            : hbuf + (d * 2 + s % 2) * q.B * q.P;
}

// The arguments of forward_step for step s of the D directions p[0 .. D-1] (G gates, S
// saved values per unit), with the forward workspaces gh [D, B, G*H], c [D, B, H] (LSTM),
// hbuf [D, 2, B, P] and mbuf [D, B, H] (inference, the latter with a projection). hout
// receives each direction's state leaving the step, which the projection writes when
// there is one (the step's own hout is then nullptr). Used by the host loop of forward()
// and, every step, by the persistent kernel (persistent.cu).
template <class T>
__host__ __device__ inline ForwardStep<T> forward_step_args(const ForwardParams<T>* p, int D,
                                                            int G, int S, bool lstm, int64_t s,
                                                            acc_t<T>* gh, acc_t<T>* c, T* hbuf,
                                                            T* mbuf, T* hrec,
                                                            T* (&hout)[kMaxDirs]) {
  const int64_t Tn = p[0].T, B = p[0].B, H = p[0].H, GH = G * H;
  const bool proj = p[0].w_hr != nullptr, saving = p[0].gates != nullptr;
  ForwardStep<T> a;
  a.D = D; a.B = B; a.H = H; a.P = p[0].P; a.lengths = p[0].lengths;
  a.ldgx = p[0].ldgx; a.ldy = p[0].ldy;
  for (int d = 0; d < kMaxDirs; ++d) {
    const int e = d < D ? d : 0;  // unused slot of a one-direction layer: a copy of 0
    const ForwardParams<T>& q = p[e];
    const int64_t t = time_of(s, Tn, q.reverse);
    hout[d] = step_state(q, e, s + 1, hbuf);
    ForwardStepDir<T>& r = a.dir[d];
    r.t = t;
    r.gx = q.gx + t * B * q.ldgx;
    r.gh = gh + e * B * GH;
    r.b_hh = q.b_hh;
    r.hin = step_state(q, e, s, hbuf);
    r.hout = proj ? nullptr : hout[d];
    r.y = proj ? nullptr : q.y + t * B * q.ldy;
    r.m = proj ? (saving ? q.m + t * B * H : mbuf + e * B * H) : nullptr;
    r.c = lstm ? c + e * B * H : nullptr;
    r.gates = saving ? q.gates + t * B * S * H : nullptr;
    r.cprev = saving && lstm ? q.cprev + t * B * H : nullptr;
    r.hin_copy = saving && s == 0 ? q.hprev + t * B * a.P : nullptr;
    Extras<T>& x = r.x;
    if (q.resets != nullptr) {
      x.resets = q.resets;
      x.steps = Tn;
      x.reverse = q.reverse;
      x.t_reset = s + 1 < Tn ? time_of(s + 1, Tn, q.reverse) : -1;
      x.h0 = q.h0;
      x.c0 = q.c0;
    }
    x.zoneout_h = q.zoneout_h != nullptr ? q.zoneout_h + t * B * a.P : nullptr;
    x.zoneout_c = q.zoneout_c != nullptr ? q.zoneout_c + t * B * H : nullptr;
    x.rec_mask = q.rec_mask;
    x.hrec = q.rec_mask != nullptr ? hrec + (e * 2 + (s + 1) % 2) * B * a.P : nullptr;
  }
  return a;
}

// The arguments of backward_step for step s (walking s = T-1 .. 0) of the D directions, with
// the backward workspaces dh [D, B, P], dc [D, B, H] (LSTM), dm [D, B, H] (projection) and
// dg [D, B, G*H] (or nullptr: no packed copy of dgh). Used by the host loop of backward()
// and, every step, by the persistent backward kernel (persistent.cu).
template <class T>
__host__ __device__ inline BackwardStep<T> backward_step_args(const BackwardParams<T>* p, int D,
                                                              int G, int S, bool lstm,
                                                              int64_t s, acc_t<T>* dh,
                                                              acc_t<T>* dc, acc_t<T>* dm,
                                                              T* dg, acc_t<T>* extra) {
  const int64_t Tn = p[0].T, B = p[0].B, H = p[0].H, P = p[0].P;
  const bool proj = p[0].w_hr != nullptr;
  BackwardStep<T> a;
  a.D = D; a.B = B; a.H = H; a.P = P; a.lengths = p[0].lengths;
  a.ldy = p[0].ldy; a.ldg = p[0].ldg;
  for (int d = 0; d < kMaxDirs; ++d) {
    const int e = d < D ? d : 0;
    const BackwardParams<T>& q = p[e];
    const int64_t t = time_of(s, Tn, q.reverse);
    BackwardStepDir<T>& r = a.dir[d];
    r.t = t;
    r.dy = proj || q.dy == nullptr ? nullptr : q.dy + t * B * q.ldy;
    r.gates = q.gates + t * B * S * H;
    r.hprev = q.hprev + t * B * P;
    r.cprev = lstm ? q.cprev + t * B * H : nullptr;
    r.dm = proj ? dm + e * B * H : nullptr;
    r.dh = dh + e * B * P;
    r.dc = lstm ? dc + e * B * H : nullptr;
    r.dgx = q.dgx + t * B * q.ldg;
    r.dgh = q.dgh + t * B * q.ldg;
    r.dg = dg != nullptr ? dg + e * B * G * H : nullptr;
    // extra: the workspaces of backward_workspace_acc after dm (see there).
    Extras<T>& x = r.x;
    if (q.resets != nullptr) {
      x.resets = q.resets;
      x.steps = Tn;
      x.reverse = q.reverse;
      x.t_reset = t;
      x.dh0acc = extra + (2 * D + e) * B * P;
      x.dc0acc = lstm ? extra + 3 * D * B * P + e * B * H : nullptr;
    }
    x.zoneout_h = q.zoneout_h != nullptr ? q.zoneout_h + t * B * P : nullptr;
    x.zoneout_c = q.zoneout_c != nullptr ? q.zoneout_c + t * B * H : nullptr;
    x.dz = proj && q.zoneout_h != nullptr ? extra + e * B * P : nullptr;
    x.rec_mask = q.rec_mask;
    x.drec = q.rec_mask != nullptr ? extra + (D + e) * B * P : nullptr;
  }
  return a;
}

// LayerNorm cells: ln_forward_step's arguments for the step whose plain arguments are `step`
// (forward_step_args), with the workspace stash [D, B, 2, H] (LnLstm).
template <class T>
inline LnForwardStep<T> ln_forward_step_args(const ForwardParams<T>* p, int D,
                                             const ForwardStep<T>& step, acc_t<T>* stash) {
  const int64_t B = p[0].B, H = p[0].H;
  LnForwardStep<T> a;
  a.step = step;
  a.eps = static_cast<acc_t<T>>(p[0].eps);
  for (int d = 0; d < kMaxDirs; ++d) {
    const int e = d < D ? d : 0;
    const ForwardParams<T>& q = p[e];
    LnForwardDir<T>& r = a.ln[d];
    r.ln_w = q.ln_w; r.ln_b = q.ln_b; r.gx_w = q.gx_w; r.gx_b = q.gx_b;
    r.lnc_w = q.lnc_w; r.lnc_b = q.lnc_b;
    r.rstd = q.ln_rstd != nullptr ? q.ln_rstd + step.dir[d].t * B * 2 : nullptr;
    r.stash = q.lnc_w != nullptr ? stash + e * B * 2 * H : nullptr;
  }
  return a;
}

// The same for ln_backward_step, with the workspace ws: dgate [D, B, G*H], then du
// [D, B, H] (LnLstm).
template <class T>
inline LnBackwardStep<T> ln_backward_step_args(const BackwardParams<T>* p, int D, int G,
                                               const BackwardStep<T>& step, acc_t<T>* ws) {
  const int64_t B = p[0].B, H = p[0].H;
  LnBackwardStep<T> a;
  a.step = step;
  a.ldgx = p[0].ldgx;
  for (int d = 0; d < kMaxDirs; ++d) {
    const int e = d < D ? d : 0;
    const BackwardParams<T>& q = p[e];
    const int64_t t = step.dir[d].t;
    LnBackwardDir<T>& r = a.ln[d];
    r.gx = q.gx + t * B * q.ldgx;
    r.gx_w = q.gx_w; r.gx_b = q.gx_b; r.ln_w = q.ln_w; r.ln_b = q.ln_b; r.b_hh = q.b_hh;
    r.lnc_w = q.lnc_w; r.lnc_b = q.lnc_b;
    r.rstd = q.ln_rstd + t * B * 2;
    r.draw = q.draw + t * B * q.ldg;
    r.dlnc = q.dlnc != nullptr ? q.dlnc + t * B * H : nullptr;
    r.dgate = ws + e * B * G * H;
    r.du = q.lnc_w != nullptr ? ws + D * B * G * H + e * B * H : nullptr;
  }
  return a;
}

template <class Params>
inline bool has_extras(const Params& p) {
  return p.resets != nullptr || p.zoneout_h != nullptr || p.rec_mask != nullptr;
}

// Workspace sizes for D directions, in elements of acc_t<T> and of T.
template <class T>
inline int64_t forward_workspace_acc(const ForwardParams<T>& p, int gates, int D) {
  // gh [D, B, G*H], c [D, B, H]; then LnLstm's stash [D, B, 2, H].
  return D * (p.B * gates * p.H + p.B * p.H) + (p.lnc_w ? D * 2 * p.B * p.H : 0);
}
template <class T>
inline int64_t forward_states_workspace(const ForwardParams<T>& p, int D) {
  // Ping-pong states [D, 2, B, P] and the pre-projection outputs [D, B, H], when there is
  // nowhere to save them.
  return p.saving() ? 0 : D * (2 * p.B * p.P + (p.w_hr ? p.B * p.H : 0));
}
template <class T>
inline int64_t forward_workspace(const ForwardParams<T>& p, int D) {
  // Then, with recurrent dropout, hrec [D, 2, B, P]: ping-pong h * rec_mask.
  return forward_states_workspace(p, D) + (p.rec_mask ? D * 2 * p.B * p.P : 0);
}
template <class T>
inline int64_t backward_extras_workspace(const BackwardParams<T>& p, int D) {
  return has_extras(p) ? D * (3 * p.B * p.P + p.B * p.H) : 0;
}
template <class T>
inline int64_t backward_workspace_acc(const BackwardParams<T>& p, int gates, int D) {
  // dh [D, B, P], dc [D, B, H], dm [D, B, H]; then, with resets, zoneout or recurrent
  // dropout, dz [D, B, P], drec [D, B, P], dh0acc [D, B, P] and dc0acc [D, B, H]; then,
  // for LayerNorm cells, dgate [D, B, G*H] and du [D, B, H] (LnLstm).
  const int64_t ln = p.layer_norm() ? D * p.B * (gates * p.H + (p.lnc_w ? p.H : 0)) : 0;
  return D * (p.B * p.P + 2 * p.B * p.H) + backward_extras_workspace(p, D) + ln;
}
template <class T>
inline int64_t backward_workspace(const BackwardParams<T>& p, int gates, int D) {
  return D > 1 ? D * p.B * gates * p.H : 0;  // dg [D, B, G*H] (two directions only)
}

#define FASTRNN_CUDA_TRY(expr)                  \
  do {                                          \
    const cudaError_t fastrnn_err_ = (expr);    \
    if (fastrnn_err_ != cudaSuccess) return fastrnn_err_; \
  } while (0)

// Distance from direction 0's pointer to direction 1's, in elements; 0 for one direction.
// Both point into the same [D, ...] stack (see above), so the difference is defined.
template <class Ptr>
inline int64_t dir_stride(const Ptr (&ptr)[kMaxDirs], int D) {
  return D > 1 ? static_cast<int64_t>(ptr[1] - ptr[0]) : 0;
}

// p: D direction params; ws_acc: forward_workspace_acc elements; ws: forward_workspace
// elements.
template <class T, class Gemm>
cudaError_t forward(CellKind kind, const ForwardParams<T>* p, int D, const Gemm& gemm,
                    acc_t<T>* ws_acc, T* ws, cudaStream_t stream) {
  using A = acc_t<T>;
  if (D < 1 || D > kMaxDirs) return cudaErrorInvalidValue;
  const bool ln = p[0].layer_norm();
  const int G = gates_of(kind), S = saved_of(kind, ln);
  const bool lstm = kind == CellKind::LSTM;
  const int64_t Tn = p[0].T, B = p[0].B, H = p[0].H, P = p[0].P, GH = G * H;
  const bool proj = p[0].w_hr != nullptr;
  A* gh = ws_acc;          // [D, B, G*H]
  A* c = gh + D * B * GH;  // [D, B, H]
  A* stash = c + D * B * H;  // [D, B, 2, H] (LayerNorm LSTM)
  T* hbuf = ws;                  // [D, 2, B, P] (inference)
  T* mbuf = ws + D * 2 * B * P;  // [D, B, H] (inference with projection)
  T* hrec = ws + forward_states_workspace(p[0], D);  // [D, 2, B, P] (recurrent dropout)
  const bool dropout = p[0].rec_mask != nullptr;

  for (int d = 0; d < D; ++d) {
    if (lstm) FASTRNN_CUDA_TRY(convert(B * H, p[d].c0, c + d * B * H, stream));
    if (dropout) FASTRNN_CUDA_TRY(multiply(B * P, p[d].h0, p[d].rec_mask, hrec + d * 2 * B * P, stream));
  }
  const T* w_hh[kMaxDirs] = {p[0].w_hh, p[D - 1].w_hh};
  const T* w_hr[kMaxDirs] = {p[0].w_hr, p[D - 1].w_hr};
  for (int64_t s = 0; s < Tn; ++s) {
    T* hout[kMaxDirs];
    const ForwardStep<T> a =
        forward_step_args(p, D, G, S, lstm, s, gh, c, hbuf, mbuf, hrec, hout);
    // The GEMM reads the state entering the step, or its copy times rec_mask.
    const T* hin[kMaxDirs] = {dropout ? hrec + (s % 2) * B * P : a.dir[0].hin,
                              dropout ? hrec + (D - 1) * 2 * B * P + (s % 2) * B * P
                                      : a.dir[1].hin};
    T* m[kMaxDirs] = {a.dir[0].m, a.dir[1].m};
    const int64_t s_hin = dir_stride(hin, D), s_hout = dir_stride(hout, D);
    const int64_t s_m = dir_stride(m, D);
    if (s_hin < 0 || s_hout < 0 || s_m < 0) return cudaErrorInvalidValue;  // see above
    gemm(D, B, GH, P, hin[0], P, s_hin, w_hh[0], P, dir_stride(w_hh, D), true, false, gh,
         GH, B * GH);
    if (ln)
      FASTRNN_CUDA_TRY(ln_forward_step(kind, ln_forward_step_args(p, D, a, stash), stream));
    else
      FASTRNN_CUDA_TRY(forward_step(kind, a, stream));

    if (proj) {  // h = m W_hr^T, then the masking of the projected state
      gemm(D, B, P, H, static_cast<const T*>(m[0]), H, s_m, w_hr[0], H, dir_stride(w_hr, D),
           true, false, hout[0], P, s_hout);
      ProjectStep<T> q;
      q.D = D; q.B = B; q.P = P; q.ldy = p[0].ldy; q.lengths = p[0].lengths;
      for (int d = 0; d < kMaxDirs; ++d) {
        q.dir[d].t = a.dir[d].t;
        q.dir[d].hin = a.dir[d].hin;
        q.dir[d].hout = hout[d];
        q.dir[d].y = p[d < D ? d : 0].y + a.dir[d].t * B * p[0].ldy;
        q.dir[d].x = a.dir[d].x;
      }
      FASTRNN_CUDA_TRY(project_step(q, stream));
    }
  }
  if (lstm) {
    for (int d = 0; d < D; ++d) {
      FASTRNN_CUDA_TRY(convert(B * H, static_cast<const A*>(c + d * B * H), p[d].c_n, stream));
    }
  }
  return cudaSuccess;
}

// p: D direction params; ws_acc: backward_workspace_acc elements; ws: backward_workspace
// elements.
template <class T, class Gemm>
cudaError_t backward(CellKind kind, const BackwardParams<T>* p, int D, const Gemm& gemm,
                     acc_t<T>* ws_acc, T* ws, cudaStream_t stream) {
  using A = acc_t<T>;
  if (D < 1 || D > kMaxDirs) return cudaErrorInvalidValue;
  const bool ln = p[0].layer_norm();
  const int G = gates_of(kind), S = saved_of(kind, ln);
  const bool lstm = kind == CellKind::LSTM;
  const int64_t Tn = p[0].T, B = p[0].B, H = p[0].H, P = p[0].P, GH = G * H;
  const bool proj = p[0].w_hr != nullptr;
  A* dh = ws_acc;          // [D, B, P]
  A* dc = dh + D * B * P;  // [D, B, H]
  A* dm = dc + D * B * H;  // [D, B, H]
  A* extra = dm + D * B * H;  // dz, drec, dh0acc [D, B, P] and dc0acc [D, B, H] (extras)
  A* ln_ws = extra + backward_extras_workspace(p[0], D);  // dgate, du (LayerNorm)
  T* dg = ws;              // [D, B, G*H] (two directions)
  const bool resets = p[0].resets != nullptr, dropout = p[0].rec_mask != nullptr;
  if (resets) {
    FASTRNN_CUDA_TRY(cudaMemsetAsync(extra + 2 * D * B * P, 0, D * (B * P + B * H) * sizeof(A),
                                     stream));
  }

  // Running gradients start at dh_n, dc_n (zero when absent).
  for (int d = 0; d < D; ++d) {
    if (p[d].dh_n)
      FASTRNN_CUDA_TRY(convert(B * P, p[d].dh_n, dh + d * B * P, stream));
    else
      FASTRNN_CUDA_TRY(cudaMemsetAsync(dh + d * B * P, 0, B * P * sizeof(A), stream));
    if (lstm && p[d].dc_n)
      FASTRNN_CUDA_TRY(convert(B * H, p[d].dc_n, dc + d * B * H, stream));
    else if (lstm)
      FASTRNN_CUDA_TRY(cudaMemsetAsync(dc + d * B * H, 0, B * H * sizeof(A), stream));
  }
  const T* w_hh[kMaxDirs] = {p[0].w_hh, p[D - 1].w_hh};
  const T* w_hr[kMaxDirs] = {p[0].w_hr, p[D - 1].w_hr};
  for (int64_t s = Tn - 1; s >= 0; --s) {
    int64_t t[kMaxDirs];
    const T* dy[kMaxDirs];
    for (int d = 0; d < kMaxDirs; ++d) {
      const BackwardParams<T>& q = p[d < D ? d : 0];
      t[d] = time_of(s, Tn, q.reverse);
      dy[d] = q.dy ? q.dy + t[d] * B * q.ldy : nullptr;
    }
    const BackwardStep<T> a = backward_step_args(p, D, G, S, lstm, s, dh, dc, dm,
                                                 D > 1 ? dg : static_cast<T*>(nullptr), extra);
    if (proj) {  // dm = (dh + dy) W_hr on valid rows
      ProjectGradStep<T> q;
      q.D = D; q.B = B; q.P = P; q.ldy = p[0].ldy; q.lengths = p[0].lengths;
      T* dhtot[kMaxDirs];
      for (int d = 0; d < kMaxDirs; ++d) {
        const int e = d < D ? d : 0;
        dhtot[d] = p[e].dhtot + t[d] * B * P;
        q.dir[d].t = t[d];
        q.dir[d].dy = dy[d];
        q.dir[d].dh = dh + e * B * P;
        q.dir[d].dhtot = dhtot[d];
        q.dir[d].x = a.dir[d].x;
      }
      const int64_t s_dhtot = dir_stride(dhtot, D);
      if (s_dhtot < 0) return cudaErrorInvalidValue;
      FASTRNN_CUDA_TRY(project_grad_step(q, stream));
      gemm(D, B, H, P, static_cast<const T*>(dhtot[0]), P, s_dhtot, w_hr[0], H,
           dir_stride(w_hr, D), false, false, dm, H, B * H);
    }

    // The gate gradients; for LayerNorm cells also LN_hh's backward, whose result draw
    // (the gradient w.r.t. h W_hh^T) then takes dgh's place in the recurrent GEMM.
    const T* rec_grad = a.dir[0].dgh;
    if (ln) {
      const LnBackwardStep<T> l = ln_backward_step_args(p, D, G, a, ln_ws);
      FASTRNN_CUDA_TRY(ln_backward_step(kind, l, stream));
      rec_grad = l.ln[0].draw;
    } else {
      FASTRNN_CUDA_TRY(backward_step(kind, a, stream));
    }

    // dh_prev = direct part + dgh W_hh. Padded rows have dgh = 0 and keep dh unchanged.
    // One direction reads dgh where it lies; two read the packed copy (their slices of
    // dgh lie in either order, which no batch stride >= 0 describes).
    // With recurrent dropout the product goes to drec and is masked into dh after.
    const T* dgh0 = D > 1 ? static_cast<const T*>(dg) : rec_grad;
    gemm(D, B, P, GH, dgh0, D > 1 ? GH : p[0].ldg, B * GH, w_hh[0], P, dir_stride(w_hh, D),
         false, !dropout, dropout ? a.dir[0].x.drec : dh, P, B * P);
    if (resets || dropout) FASTRNN_CUDA_TRY(backward_tail_step(a, stream));
  }
  for (int d = 0; d < D; ++d) {
    const A* dh_first = dh + d * B * P;
    const A* dc_first = dc + d * B * H;
    if (resets) {  // dh0, dc0: the gradients gathered at resets plus those reaching step 0
      A* dh0acc = extra + (2 * D + d) * B * P;
      A* dc0acc = extra + 3 * D * B * P + d * B * H;
      FASTRNN_CUDA_TRY(accumulate(B * P, dh_first, dh0acc, stream));
      if (lstm) FASTRNN_CUDA_TRY(accumulate(B * H, dc_first, dc0acc, stream));
      dh_first = dh0acc;
      dc_first = dc0acc;
    }
    FASTRNN_CUDA_TRY(convert(B * P, dh_first, p[d].dh0, stream));
    if (lstm) FASTRNN_CUDA_TRY(convert(B * H, dc_first, p[d].dc0, stream));
  }
  return cudaSuccess;
}

#undef FASTRNN_CUDA_TRY

}  // namespace cuda
}  // namespace fastrnn
