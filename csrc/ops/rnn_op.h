// The fastrnn ops, device-agnostic: argument checks, output allocation, the large GEMMs
// (input projection, weight gradients) as ATen calls, and the time loop handed to the
// backend of the input's device.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "../kernels/params.h"
#include "checks.h"

namespace fastrnn {

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor>;
using BackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor>;
using LnBackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOut forward_op(const std::string& cell, const at::Tensor& x, const at::Tensor& h0,
                      const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                      const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
                      const c10::optional<at::Tensor>& lengths, bool reverse, bool save,
                      const c10::optional<at::Tensor>& resets,
                      const c10::optional<at::Tensor>& zoneout_h,
                      const c10::optional<at::Tensor>& zoneout_c,
                      const c10::optional<at::Tensor>& rec_mask, bool bf16_gemms);

BackwardOut backward_op(const std::string& cell, const c10::optional<at::Tensor>& dy,
                        const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n,
                        const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const c10::optional<at::Tensor>& w_hr,
                        const c10::optional<at::Tensor>& lengths, const at::Tensor& gates,
                        const at::Tensor& hprev, const at::Tensor& cprev, const at::Tensor& m,
                        bool reverse, bool input_grad, const c10::optional<at::Tensor>& resets,
                        const c10::optional<at::Tensor>& zoneout_h,
                        const c10::optional<at::Tensor>& zoneout_c,
                        const c10::optional<at::Tensor>& rec_mask, bool bf16_gemms);

// LayerNorm LSTM/GRU (cells.h: LnLstm, LnGru), one layer, all directions. gx [T, B, D*G*H]:
// the input projections, normalised (the directions side by side); the input parts are
// gx * gx_w + gx_b, gx_w and gx_b [D, G*H] (LN_ih's affine and the input bias); w_hh
// [D, G*H, H]; b_hh [D, G*H] or none (GRU's recurrent bias); ln_w, ln_b [D, G*H] (LN_hh);
// lnc_w, lnc_b [D, H] (LN_c, LSTM only). Outputs as forward_op's, with ln_rstd [D, T, B, 2]
// (params.h) last instead of m.
ForwardOut ln_forward_op(const std::string& cell, const at::Tensor& gx, const at::Tensor& h0,
                         const c10::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                         const c10::optional<at::Tensor>& b_hh, const at::Tensor& ln_w,
                         const at::Tensor& ln_b, const c10::optional<at::Tensor>& lnc_w,
                         const c10::optional<at::Tensor>& lnc_b, const at::Tensor& gx_w,
                         const at::Tensor& gx_b, const c10::optional<at::Tensor>& lengths,
                         bool reverse, bool save,
                         double eps, const c10::optional<at::Tensor>& resets,
                         const c10::optional<at::Tensor>& zoneout_h,
                         const c10::optional<at::Tensor>& zoneout_c,
                         const c10::optional<at::Tensor>& rec_mask);

// Its gradients: (dgx [T, B, D*G*H], dh0, dc0, dw_hh, db_hh [D, G*H] (also LN_hh's bias
// gradient: both are added to the same values), dln_w [D, G*H], dlnc_w, dlnc_b [D, H]
// (empty for GRU), dgx_w, dgx_b [D, G*H]).
LnBackwardOut ln_backward_op(const std::string& cell, const c10::optional<at::Tensor>& dy,
                           const c10::optional<at::Tensor>& dh_n,
                           const c10::optional<at::Tensor>& dc_n, const at::Tensor& gx,
                           const at::Tensor& gx_w, const at::Tensor& gx_b,
                           const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
                           const at::Tensor& ln_w, const at::Tensor& ln_b,
                           const c10::optional<at::Tensor>& lnc_w,
                           const c10::optional<at::Tensor>& lnc_b,
                           const c10::optional<at::Tensor>& lengths, const at::Tensor& gates,
                           const at::Tensor& hprev, const at::Tensor& cprev,
                           const at::Tensor& ln_rstd, bool reverse,
                           const c10::optional<at::Tensor>& resets,
                           const c10::optional<at::Tensor>& zoneout_h,
                           const c10::optional<at::Tensor>& zoneout_c,
                           const c10::optional<at::Tensor>& rec_mask);

// a @ b for 2-D tensors: fastrnn's own CPU GEMM (the one the layers use), ATen's on CUDA.
at::Tensor mm_op(const at::Tensor& a, const at::Tensor& b);

// Contiguous tensors of one layer; undefined (or empty) where unused. Per-direction
// tensors carry a leading [D] axis; shapes otherwise as in params.h.
struct LoopTensors {
  Shapes s;
  bool reverse = false;
  at::Tensor gx, w_hh, b_hh, w_hr, h0, c0, lengths, y, h_n, c_n, gates, hprev, cprev, m;
  at::Tensor resets, zoneout_h, zoneout_c, rec_mask;  // optional regularisation and resets
  at::Tensor gx16, gx16_bias;  // CPU: ForwardParams::gx16, gx16_bias (gx then undefined)
  at::Tensor dy, dh_n, dc_n, dgx, dgh, dh0, dc0, dhtot;  // backward only
  // LayerNorm cells (ln_w defined): LN_hh, LN_c, the saved 1/std; backward's draw, dlnc.
  at::Tensor ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b, ln_rstd, draw, dlnc;
  double eps = 0;
  bool bf16_step = false;  // ForwardParams::bf16_step, BackwardParams::bf16_step
};

// T: the tensor's scalar type; E: the element type the kernels see, of the same layout
// (e.g. at::Half as CUDA's __half).
template <class T, class E = T>
const E* cptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<const E*>(t.data_ptr<T>()) : nullptr;
}
template <class T, class E = T>
E* mptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<E*>(t.mutable_data_ptr<T>()) : nullptr;
}
// Direction d's slice of a per-direction tensor [D, ...] (contiguous): a pointer into its
// data, not a tensor (a select costs about a microsecond, and a call takes a dozen).
template <class T, class E = T>
const E* cptr_d(const at::Tensor& t, int d) {
  const E* p = cptr<T, E>(t);
  return p ? p + d * t.stride(0) : nullptr;
}
template <class T, class E = T>
E* mptr_d(const at::Tensor& t, int d) {
  E* p = mptr<T, E>(t);
  return p ? p + d * t.stride(0) : nullptr;
}
inline const int64_t* lengths_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<int64_t>() : nullptr;
}
inline const uint8_t* resets_ptr(const at::Tensor& t) {  // bool [T, B] as bytes
  return t.defined() ? reinterpret_cast<const uint8_t*>(t.data_ptr<bool>()) : nullptr;
}

// Direction d's view of the tensors. Per-direction tensors are stacked on a leading
// [D] axis; gx, y, dy, dgx and dgh hold the directions side by side within each row.
template <class T, class E = T>
ForwardParams<E> forward_params(const LoopTensors& a, int d) {
  const Shapes& s = a.s;
  const int64_t GH = s.G * s.H;
  ForwardParams<E> p;
  p.T = s.T; p.B = s.B; p.H = s.H; p.P = s.P;
  p.ldgx = s.D * GH; p.ldy = s.D * s.P;
  p.gx = a.gx.defined() ? cptr<T, E>(a.gx) + d * GH : nullptr;
  if (a.gx16.defined()) {
    p.gx16 = reinterpret_cast<const uint16_t*>(a.gx16.data_ptr<at::BFloat16>()) + d * GH;
    p.gx16_bias = a.gx16_bias.defined() ? cptr<T, E>(a.gx16_bias) + d * GH : nullptr;
  }
  p.w_hh = cptr_d<T, E>(a.w_hh, d); p.b_hh = cptr_d<T, E>(a.b_hh, d);
  p.w_hr = cptr_d<T, E>(a.w_hr, d); p.h0 = cptr_d<T, E>(a.h0, d); p.c0 = cptr_d<T, E>(a.c0, d);
  p.lengths = lengths_ptr(a.lengths); p.reverse = a.reverse != (d == 1);
  p.resets = resets_ptr(a.resets);
  p.zoneout_h = cptr_d<T, E>(a.zoneout_h, d); p.zoneout_c = cptr_d<T, E>(a.zoneout_c, d);
  p.rec_mask = cptr_d<T, E>(a.rec_mask, d);
  p.y = mptr<T, E>(a.y) + d * s.P;
  p.h_n = mptr_d<T, E>(a.h_n, d); p.c_n = mptr_d<T, E>(a.c_n, d);
  p.gates = mptr_d<T, E>(a.gates, d); p.hprev = mptr_d<T, E>(a.hprev, d);
  p.cprev = mptr_d<T, E>(a.cprev, d); p.m = mptr_d<T, E>(a.m, d);
  p.ln_w = cptr_d<T, E>(a.ln_w, d); p.ln_b = cptr_d<T, E>(a.ln_b, d);
  p.lnc_w = cptr_d<T, E>(a.lnc_w, d); p.lnc_b = cptr_d<T, E>(a.lnc_b, d);
  p.gx_w = cptr_d<T, E>(a.gx_w, d); p.gx_b = cptr_d<T, E>(a.gx_b, d);
  p.eps = a.eps; p.ln_rstd = mptr_d<T, E>(a.ln_rstd, d);
  p.bf16_step = a.bf16_step;
  return p;
}

template <class T, class E = T>
BackwardParams<E> backward_params(const LoopTensors& a, int d) {
  const Shapes& s = a.s;
  const int64_t GH = s.G * s.H;
  BackwardParams<E> p;
  p.T = s.T; p.B = s.B; p.H = s.H; p.P = s.P;
  p.ldy = s.D * s.P; p.ldg = s.D * GH;
  p.w_hh = cptr_d<T, E>(a.w_hh, d); p.w_hr = cptr_d<T, E>(a.w_hr, d);
  p.lengths = lengths_ptr(a.lengths); p.reverse = a.reverse != (d == 1);
  p.resets = resets_ptr(a.resets);
  p.zoneout_h = cptr_d<T, E>(a.zoneout_h, d); p.zoneout_c = cptr_d<T, E>(a.zoneout_c, d);
  p.rec_mask = cptr_d<T, E>(a.rec_mask, d);
  p.dy = a.dy.defined() ? cptr<T, E>(a.dy) + d * s.P : nullptr;
  p.gates = cptr_d<T, E>(a.gates, d); p.hprev = cptr_d<T, E>(a.hprev, d);
  p.cprev = cptr_d<T, E>(a.cprev, d);
  p.dgx = mptr<T, E>(a.dgx) + d * GH; p.dgh = mptr<T, E>(a.dgh) + d * GH;
  p.dh_n = cptr_d<T, E>(a.dh_n, d); p.dc_n = cptr_d<T, E>(a.dc_n, d);
  p.dh0 = mptr_d<T, E>(a.dh0, d); p.dc0 = mptr_d<T, E>(a.dc0, d);
  p.dhtot = mptr_d<T, E>(a.dhtot, d);
  p.ln_w = cptr_d<T, E>(a.ln_w, d);
  p.lnc_w = cptr_d<T, E>(a.lnc_w, d); p.lnc_b = cptr_d<T, E>(a.lnc_b, d);
  p.ln_rstd = cptr_d<T, E>(a.ln_rstd, d);
  p.gx = a.gx.defined() ? cptr<T, E>(a.gx) + d * GH : nullptr; p.ldgx = s.D * GH;
  p.gx_w = cptr_d<T, E>(a.gx_w, d); p.gx_b = cptr_d<T, E>(a.gx_b, d);
  p.ln_b = cptr_d<T, E>(a.ln_b, d); p.b_hh = cptr_d<T, E>(a.b_hh, d);
  p.draw = a.draw.defined() ? mptr<T, E>(a.draw) + d * GH : nullptr;
  p.dlnc = mptr_d<T, E>(a.dlnc, d);
  p.bf16_step = a.bf16_step;
  return p;
}

// The CPU scratch memory of the calling thread (the large temporaries of a call, gx, dgx
// and the bf16 GEMMs' operands, kept for the next call): free it; its size in bytes.
void release_scratch();
int64_t scratch_bytes();

// Backends: run the time loop. Defined per device (cpu_loop.cpp, cuda_loop.cu).
void cpu_forward_loop(const LoopTensors& a);
// out [M, N] (row stride out.stride(0), unit column stride) = a [M, K] @ b [K, N] (+ bias
// [N], contiguous, or undefined) (+ out when accumulate); a and b may have any strides.
void cpu_matmul_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                    const at::Tensor& bias, bool accumulate);
// out [C] = column sums of t [N, C] (any strides), and when u is defined (t's shape and
// column stride), out_u [C] = those of t * u, in the same pass; each summed in row order.
void cpu_column_sum_out(at::Tensor& out, const at::Tensor& t, const at::Tensor& u,
                        at::Tensor& out_u);
void cpu_backward_loop(const LoopTensors& a);
void cuda_forward_loop(const LoopTensors& a);
void cuda_backward_loop(const LoopTensors& a);

// Whether the CUDA forward and backward first try the persistent kernels
// (csrc/kernels/cuda/persistent.cu; layers they do not fit run the per-step path). Off by
// default. Process-wide.
bool cuda_persistent();
void set_cuda_persistent(bool on);
// Forward and backward calls the persistent kernels have run since the process started.
int64_t cuda_persistent_runs();
void count_cuda_persistent_run();

}  // namespace fastrnn
