#include "checks.h"

#include <c10/util/Exception.h>

namespace fastrnn {
namespace {

void check_same(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastrnn: ", name, " has dtype ",
              t.scalar_type(), " but input x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastrnn: ", name, " is on ", t.device(),
              " but input x is on ", x.device());
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "fastrnn: ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

// The cell and x: sets kind, G, S, T, B, I.
Shapes check_cell_and_x(const std::string& cell, const at::Tensor& x) {
  Shapes s{};
  s.kind = parse_cell(cell);
  s.G = gates_of(s.kind);
  s.S = saved_of(s.kind);
  TORCH_CHECK(x.dim() == 3, "fastrnn: x must be 3-D [seq_len, batch, input_size], got ",
              x.dim(), "-D with shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  (x.is_cuda() && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16)),
              "fastrnn: unsupported dtype ", x.scalar_type(), " on ", x.device(),
              " (CPU supports float32 and float64)");
  s.T = x.size(0);
  s.B = x.size(1);
  s.I = x.size(2);
  return s;
}

// w_hh [D, G*H, P], w_ih [D, G*H, I], w_hr [D, P, H] (LSTM only): sets D, H, P, proj.
void check_weights(Shapes& s, const std::string& cell, const at::Tensor& x,
                   const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor* whr) {
  TORCH_CHECK(w_hh.dim() == 3 && (w_hh.size(0) == 1 || w_hh.size(0) == 2),
              "fastrnn: w_hh must be 3-D [directions (1 or 2), gates*hidden_size, state_size], got ",
              w_hh.sizes());
  s.D = w_hh.size(0);
  TORCH_CHECK(w_hh.size(1) % s.G == 0 && w_hh.size(1) > 0, "fastrnn: w_hh has ", w_hh.size(1),
              " rows, which is not a positive multiple of ", s.G, " gates for cell '", cell, "'");
  s.H = w_hh.size(1) / s.G;
  s.P = w_hh.size(2);
  check_same(x, w_hh, "w_hh");
  check_shape(w_ih, {s.D, s.G * s.H, s.I}, "w_ih");
  check_same(x, w_ih, "w_ih");

  TORCH_CHECK(!whr || s.kind == CellKind::LSTM,
              "fastrnn: w_hr (projection) is only supported for cell 'lstm'");
  s.proj = whr != nullptr;
  if (s.proj) {
    check_shape(*whr, {s.D, s.P, s.H}, "w_hr");
    check_same(x, *whr, "w_hr");
    TORCH_CHECK(s.P < s.H, "fastrnn: proj_size (", s.P, ") must be smaller than hidden_size (",
                s.H, ")");
  } else {
    TORCH_CHECK(s.P == s.H, "fastrnn: w_hh must have shape [", s.D, ", ", s.G * s.H, ", ", s.H,
                "], got ", w_hh.sizes());
  }
}

void check_lengths(const at::Tensor& len, const at::Tensor& x, int64_t B) {
  TORCH_CHECK(len.scalar_type() == at::kLong, "fastrnn: lengths must be int64, got ",
              len.scalar_type());
  TORCH_CHECK(len.dim() == 1 && len.size(0) == B, "fastrnn: lengths must have shape [", B,
              "] (one length per batch entry), got ", len.sizes());
  TORCH_CHECK(len.device() == x.device(), "fastrnn: lengths is on ", len.device(),
              " but input x is on ", x.device());
}

// A tensor saved by forward, when there is anything to save (T * B > 0).
void check_saved(const at::Tensor& x, const at::Tensor& t, at::IntArrayRef expected,
                 const char* name) {
  if (c10::multiply_integers(expected) == 0) return;
  check_shape(t, expected, name);
  check_same(x, t, name);
}

}  // namespace

CellKind parse_cell(const std::string& cell) {
  if (cell == "lstm") return CellKind::LSTM;
  if (cell == "gru") return CellKind::GRU;
  if (cell == "rnn_tanh") return CellKind::RNN_TANH;
  if (cell == "rnn_relu") return CellKind::RNN_RELU;
  TORCH_CHECK(false, "fastrnn: unknown cell '", cell,
              "'; expected one of 'lstm', 'gru', 'rnn_tanh', 'rnn_relu'");
}

Shapes check_forward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0,
                     const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                     const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
                     const c10::optional<at::Tensor>& lengths) {
  Shapes s = check_cell_and_x(cell, x);
  check_weights(s, cell, x, w_ih, w_hh, opt(w_hr));
  check_gate_vector(s, x, b_ih, "b_ih");
  check_gate_vector(s, x, b_hh, "b_hh");
  check_state(s, x, h0, c0, lengths);
  return s;
}

void check_gate_vector(const Shapes& s, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                       const char* name) {
  if (const at::Tensor* b = opt(v)) {
    check_shape(*b, {s.D, s.G * s.H}, name);
    check_same(x, *b, name);
  }
}

void check_state(const Shapes& s, const at::Tensor& x, const at::Tensor& h0,
                 const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths) {
  check_shape(h0, {s.D, s.B, s.P}, "h0");
  check_same(x, h0, "h0");
  const at::Tensor* c = opt(c0);
  if (s.kind == CellKind::LSTM) {
    TORCH_CHECK(c, "fastrnn: cell 'lstm' needs c0");
    check_shape(*c, {s.D, s.B, s.H}, "c0");
    check_same(x, *c, "c0");
  } else {
    TORCH_CHECK(!c, "fastrnn: c0 is only used by cell 'lstm'");
  }
  if (const at::Tensor* len = opt(lengths)) check_lengths(*len, x, s.B);
}

Shapes check_ln(const std::string& cell, const at::Tensor& gx, const at::Tensor& w_hh,
                const at::Tensor& ln_w, const c10::optional<at::Tensor>& lnc_w,
                const c10::optional<at::Tensor>& lnc_b) {
  Shapes s = check_cell_and_x(cell, gx);
  TORCH_CHECK(s.kind == CellKind::LSTM || s.kind == CellKind::GRU,
              "fastrnn: LayerNorm cells are 'lstm' and 'gru', got '", cell, "'");
  TORCH_CHECK(w_hh.dim() == 3 && (w_hh.size(0) == 1 || w_hh.size(0) == 2) &&
                  w_hh.size(1) > 0 && w_hh.size(1) == s.G * w_hh.size(2),
              "fastrnn: w_hh must be 3-D [directions (1 or 2), ", s.G,
              " * hidden_size, hidden_size], got ", w_hh.sizes());
  check_same(gx, w_hh, "w_hh");
  s.D = w_hh.size(0);
  s.H = s.P = w_hh.size(2);
  s.proj = false;
  s.S = saved_of(s.kind, true);
  TORCH_CHECK(s.I == s.D * s.G * s.H, "fastrnn: gx must have shape [", s.T, ", ", s.B, ", ",
              s.D * s.G * s.H, "] (the input parts of every direction), got ", gx.sizes());
  check_gate_vector(s, gx, ln_w, "ln_w");
  const bool lstm = s.kind == CellKind::LSTM;
  for (auto [v, name] :
       {std::make_pair(opt(lnc_w), "lnc_w"), std::make_pair(opt(lnc_b), "lnc_b")}) {
    TORCH_CHECK(!v != lstm, "fastrnn: ", name,
                lstm ? " is needed by cell 'lstm'" : " is only used by cell 'lstm'");
    if (!v) continue;
    check_shape(*v, {s.D, s.H}, name);
    check_same(gx, *v, name);
  }
  return s;
}

Shapes check_backward(const std::string& cell, const at::Tensor& x, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,
                      const at::Tensor& gates, const at::Tensor& hprev) {
  Shapes s = check_cell_and_x(cell, x);
  check_weights(s, cell, x, w_ih, w_hh, opt(w_hr));
  check_saved_state(s, x, gates, hprev);
  return s;
}

void check_saved_state(const Shapes& s, const at::Tensor& x, const at::Tensor& gates,
                       const at::Tensor& hprev) {
  TORCH_CHECK(gates.numel() == s.D * s.T * s.B * s.S * s.H &&
                  hprev.numel() == s.D * s.T * s.B * s.P,
              "fastrnn: backward needs the state saved by forward, but forward ran with "
              "save=False (inference); run it with gradients enabled");
  check_saved(x, gates, {s.D, s.T, s.B, s.S * s.H}, "gates");
  check_saved(x, hprev, {s.D, s.T, s.B, s.P}, "hprev");
}

void check_backward_rest(const Shapes& s, const at::Tensor& x, const at::Tensor& dy,
                         const at::Tensor& dh_n, const at::Tensor& dc_n,
                         const at::Tensor& lengths, const at::Tensor& cprev,
                         const at::Tensor& m) {
  const bool lstm = s.kind == CellKind::LSTM;
  if (dy.defined()) {
    check_shape(dy, {s.T, s.B, s.D * s.P}, "dy");
    check_same(x, dy, "dy");
  }
  if (dh_n.defined()) {
    check_shape(dh_n, {s.D, s.B, s.P}, "dh_n");
    check_same(x, dh_n, "dh_n");
  }
  if (lstm) {
    if (dc_n.defined()) {
      check_shape(dc_n, {s.D, s.B, s.H}, "dc_n");
      check_same(x, dc_n, "dc_n");
    }
  } else {  // the gradient of the empty c_n output, if any
    TORCH_CHECK(!dc_n.defined() || dc_n.numel() == 0,
                "fastrnn: dc_n is only used by cell 'lstm'");
  }
  if (lengths.defined()) check_lengths(lengths, x, s.B);
  if (lstm) check_saved(x, cprev, {s.D, s.T, s.B, s.H}, "cprev");
  if (s.proj && m.defined()) check_saved(x, m, {s.D, s.T, s.B, s.H}, "m");
}

Shapes check_backward(const std::string& cell, const c10::optional<at::Tensor>& dy,
                      const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n,
                      const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const c10::optional<at::Tensor>& w_hr,
                      const c10::optional<at::Tensor>& lengths, const at::Tensor& gates,
                      const at::Tensor& hprev, const at::Tensor& cprev, const at::Tensor& m) {
  const Shapes s = check_backward(cell, x, w_ih, w_hh, w_hr, gates, hprev);
  auto def = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
  check_backward_rest(s, x, def(dy), def(dh_n), def(dc_n), def(lengths), cprev, m);
  // As forward_op does for host-side lengths (device-side ones are read unchecked).
  if (const at::Tensor* len = opt(lengths); len && len->is_cpu()) {
    check_length_values(*len, s.T);
  }
  return s;
}

void check_resets(const c10::optional<at::Tensor>& resets, const at::Tensor& x,
                  const Shapes& s) {
  const at::Tensor* r = opt(resets);
  if (!r) return;
  TORCH_CHECK(r->scalar_type() == at::kBool, "fastrnn: resets must be a bool tensor, got ",
              r->scalar_type());
  TORCH_CHECK(r->dim() == 2 && r->size(0) == s.T && r->size(1) == s.B,
              "fastrnn: resets must have shape [", s.T, ", ", s.B,
              "] (seq_len, batch: one flag per step and sequence), got ", r->sizes());
  TORCH_CHECK(r->device() == x.device(), "fastrnn: resets is on ", r->device(),
              " but input x is on ", x.device());
}

void check_zoneout(const c10::optional<at::Tensor>& zoneout_h,
                   const c10::optional<at::Tensor>& zoneout_c, const at::Tensor& x,
                   const Shapes& s) {
  const at::Tensor* zh = opt(zoneout_h);
  const at::Tensor* zc = opt(zoneout_c);
  if (s.kind == CellKind::LSTM) {
    TORCH_CHECK(!zh == !zc, "fastrnn: cell 'lstm' takes zoneout_h and zoneout_c together");
  } else {
    TORCH_CHECK(!zc, "fastrnn: zoneout_c is only used by cell 'lstm'");
  }
  if (!zh) return;
  check_shape(*zh, {s.D, s.T, s.B, s.P}, "zoneout_h");
  check_same(x, *zh, "zoneout_h");
  if (zc) {
    check_shape(*zc, {s.D, s.T, s.B, s.H}, "zoneout_c");
    check_same(x, *zc, "zoneout_c");
  }
}

void check_rec_mask(const c10::optional<at::Tensor>& rec_mask, const at::Tensor& x,
                    const Shapes& s) {
  const at::Tensor* r = opt(rec_mask);
  if (!r) return;
  check_shape(*r, {s.D, s.B, s.P}, "rec_mask");
  check_same(x, *r, "rec_mask");
}

void check_length_values(const at::Tensor& lengths, int64_t T) {
  if (lengths.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(lengths);
  const int64_t mn = lo.item<int64_t>(), mx = hi.item<int64_t>();
  TORCH_CHECK(mn >= 0, "fastrnn: lengths must be non-negative, got ", mn);
  TORCH_CHECK(mx <= T, "fastrnn: lengths must not exceed the sequence length ", T, ", got ", mx);
}

void check_no_tangents(const char* op,
                       std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  for (const auto& [name, t] : args)
    TORCH_CHECK_NOT_IMPLEMENTED(!t || !t->_fw_grad(/*level=*/0).defined(), "fastrnn: ", op,
                                " does not support forward-mode AD (", name,
                                " is a dual tensor); use reverse-mode autograd");
}

}  // namespace fastrnn
