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

// Validates a backward call and returns its sizes: every argument is checked as
// check_forward checks its own (shape, dtype, device), so that no kernel is handed a
// pointer to another device's memory. Arguments in backward_op's order.
Shapes check_backward(const std::string& cell, const c10::optional<at::Tensor>& dy,
                      const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n,
                      const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const c10::optional<at::Tensor>& w_hr,
                      const c10::optional<at::Tensor>& lengths, const at::Tensor& gates,
                      const at::Tensor& hprev, const at::Tensor& cprev, const at::Tensor& m);

// The part of the above that needs only x, the weights and the saved gates/hprev.
Shapes check_backward(const std::string& cell, const at::Tensor& x, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,
                      const at::Tensor& gates, const at::Tensor& hprev);

// The rest: the incoming gradients dy [T, B, D*P], dh_n [D, B, P], dc_n [D, B, H] (LSTM),
// lengths [B] int64, and the saved cprev [D, T, B, H] (LSTM) and m [D, T, B, H] (projection),
// against the sizes s of a backward call. Undefined tensors are absent; x may be any tensor
// with x's dtype and device.
void check_backward_rest(const Shapes& s, const at::Tensor& x, const at::Tensor& dy,
                         const at::Tensor& dh_n, const at::Tensor& dc_n,
                         const at::Tensor& lengths, const at::Tensor& cprev, const at::Tensor& m);

// resets: bool [T, B] on x's device, or absent.
void check_resets(const c10::optional<at::Tensor>& resets, const at::Tensor& x, const Shapes& s);

// Zoneout weights: zoneout_h [D, T, B, P] and, for LSTM, zoneout_c [D, T, B, H] (both or
// neither), x's dtype and device, or absent.
void check_zoneout(const c10::optional<at::Tensor>& zoneout_h,
                   const c10::optional<at::Tensor>& zoneout_c, const at::Tensor& x,
                   const Shapes& s);

// Recurrent dropout mask rec_mask [D, B, P], x's dtype and device, or absent.
void check_rec_mask(const c10::optional<at::Tensor>& rec_mask, const at::Tensor& x,
                    const Shapes& s);

// LayerNorm cells (ln_forward/ln_backward): cell 'lstm' or 'gru'; gx [T, B, D*G*H] stands
// for x; w_hh [D, G*H, H]; ln_w [D, G*H]; lnc_w [D, H] for 'lstm' only (lnc_b likewise,
// when given). Sets every size (I = D*G*H, P = H, S the LayerNorm cell's saved values).
Shapes check_ln(const std::string& cell, const at::Tensor& gx, const at::Tensor& w_hh,
                const at::Tensor& ln_w, const c10::optional<at::Tensor>& lnc_w,
                const c10::optional<at::Tensor>& lnc_b);

// h0 [D, B, P], c0 [D, B, H] for LSTM (absent otherwise), lengths [B] int64 or absent.
void check_state(const Shapes& s, const at::Tensor& x, const at::Tensor& h0,
                 const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths);

// A [D, G*H] vector parameter (a bias or LN_hh's weight or bias), when given.
void check_gate_vector(const Shapes& s, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                       const char* name);

// Saved by forward for backward: the gates [D, T, B, S*H] and hprev [D, T, B, P], present
// (forward ran with save=True) and shaped for s.
void check_saved_state(const Shapes& s, const at::Tensor& x, const at::Tensor& gates,
                       const at::Tensor& hprev);

// lengths in [0, T]; reads the values, so only for host-side lengths.
void check_length_values(const at::Tensor& lengths, int64_t T);

inline const at::Tensor* opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// Forward-mode AD has no formula in fastrnn: an argument that carries a tangent (a dual
// tensor of torch.autograd.forward_ad) is an error (NotImplementedError), never a result
// whose tangent was dropped. args: (name, tensor or nullptr) pairs of the op `op`.
void check_no_tangents(const char* op,
                       std::initializer_list<std::pair<const char*, const at::Tensor*>> args);

}  // namespace fastrnn
