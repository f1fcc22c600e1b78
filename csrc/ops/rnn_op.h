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

ForwardOut forward_op(const std::string& cell, const at::Tensor& x, const at::Tensor& h0,
                      const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                      const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
                      const c10::optional<at::Tensor>& lengths, bool reverse, bool save);

BackwardOut backward_op(const std::string& cell, const c10::optional<at::Tensor>& dy,
                        const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n,
                        const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const c10::optional<at::Tensor>& w_hr,
                        const c10::optional<at::Tensor>& lengths, const at::Tensor& gates,
                        const at::Tensor& hprev, const at::Tensor& cprev, const at::Tensor& m,
                        bool reverse, bool input_grad);

// Contiguous tensors of one recurrence; undefined where unused. Shapes as in params.h.
struct LoopTensors {
  Shapes s;
  bool reverse = false;
  at::Tensor gx, w_hh, b_hh, w_hr, h0, c0, lengths, y, h_n, c_n, gates, hprev, cprev, m;
  at::Tensor dy, dgx, dgh, dh, dc, dhtot;  // backward only
};

template <class T>
const T* cptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}
template <class T>
T* mptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.mutable_data_ptr<T>() : nullptr;
}
inline const int64_t* lengths_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<int64_t>() : nullptr;
}

template <class T>
ForwardParams<T> forward_params(const LoopTensors& a) {
  ForwardParams<T> p;
  p.T = a.s.T; p.B = a.s.B; p.H = a.s.H; p.P = a.s.P;
  p.gx = cptr<T>(a.gx); p.w_hh = cptr<T>(a.w_hh); p.b_hh = cptr<T>(a.b_hh);
  p.w_hr = cptr<T>(a.w_hr); p.h0 = cptr<T>(a.h0); p.c0 = cptr<T>(a.c0);
  p.lengths = lengths_ptr(a.lengths); p.reverse = a.reverse;
  p.y = mptr<T>(a.y); p.h_n = mptr<T>(a.h_n); p.c_n = mptr<T>(a.c_n);
  p.gates = mptr<T>(a.gates); p.hprev = mptr<T>(a.hprev); p.cprev = mptr<T>(a.cprev);
  p.m = mptr<T>(a.m);
  return p;
}

template <class T>
BackwardParams<T> backward_params(const LoopTensors& a) {
  BackwardParams<T> p;
  p.T = a.s.T; p.B = a.s.B; p.H = a.s.H; p.P = a.s.P;
  p.w_hh = cptr<T>(a.w_hh); p.w_hr = cptr<T>(a.w_hr);
  p.lengths = lengths_ptr(a.lengths); p.reverse = a.reverse;
  p.dy = cptr<T>(a.dy); p.gates = cptr<T>(a.gates); p.hprev = cptr<T>(a.hprev);
  p.cprev = cptr<T>(a.cprev);
  p.dgx = mptr<T>(a.dgx); p.dgh = mptr<T>(a.dgh); p.dh = mptr<T>(a.dh); p.dc = mptr<T>(a.dc);
  p.dhtot = mptr<T>(a.dhtot);
  return p;
}

// Backends: run the time loop. Defined per device (cpu_loop.cpp, cuda/…).
void cpu_forward_loop(const LoopTensors& a);
void cpu_backward_loop(const LoopTensors& a);
void cuda_forward_loop(const LoopTensors& a);
void cuda_backward_loop(const LoopTensors& a);

}  // namespace fastrnn
