// Argument checks and shape inference shared by every backend of the fastrnn ops.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "../kernels/cells.h"

namespace fastrnn {

struct Shapes {
  CellKind kind;
  int64_t D, T, B, I, H, P;  // directions, steps, batch, input, hidden, state (proj or H)
  int G, S;
  bool proj;
};

CellKind parse_cell(const std::string& cell);

// Validates a forward call and returns its sizes. Errors name the argument and what was
// expected, in torch.nn's terms.
Shapes check_forward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0,
                     const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                     const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
                     const c10::optional<at::Tensor>& lengths);

// Sizes for a backward call, from the tensors the forward saved.
Shapes check_backward(const std::string& cell, const at::Tensor& x, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,
                      const at::Tensor& gates, const at::Tensor& hprev);

// lengths in [0, T]; reads the values, so only for host-side lengths.
void check_length_values(const at::Tensor& lengths, int64_t T);

inline const at::Tensor* opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

}  // namespace fastrnn
