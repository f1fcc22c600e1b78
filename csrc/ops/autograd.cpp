// fastrnn::autograd_forward: fastrnn::forward with its derivative in C++, for eager calls
// that record autograd (python/fastrnn/ops.py: _run). A C++ autograd Function costs a
// few microseconds a call where a Python autograd.Function (and the formula registered
// in ops.py, which traced calls keep: torch.compile, export) costs tens. Both take the
// first-order gradients from fastrnn::backward. When the backward is itself recorded
// (create_graph=True: double backward), they come from fastrnn::grad_graph instead,
// which ops.py implements as a differentiable per-step recomputation of the layer.
// A cell's call (modules.py) takes its one-step form: x [B, I], h0 [B, P], c0 [B, H] and
// the parameters as they are, y, h_n, c_n and the gradients in those shapes, with no view
// node on either side.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "rnn_op.h"

namespace fastrnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

// The inputs of fastrnn::forward that take a gradient, in schema order after `cell`:
// x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr. Its other arguments (lengths, the flags,
// resets, the zoneout weights and the dropout mask) take none.
constexpr int kGradInputs = 8;
// Arguments of LayerFunction::forward: backward returns one entry per argument.
constexpr int kArguments = 17;

at::Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// One direction's weights (w_ih, w_hh, b_ih, b_hh, w_hr) may come bare, without their
// leading [1] axis: the parameters themselves, which spares autograd a view node for each
// in every call. `bare` (w_hh is 2-D) gives them that axis for fastrnn::forward/backward,
// and takes it off their gradients. A one-step call (a cell's: x 2-D) also gives x [B, I],
// h0 [B, P] and c0 [B, H] their [1] axis (T = 1, D = 1), and takes it off y, h_n, c_n and
// their gradients. The axis comes and goes as a plain view (an unsqueeze costs 4x more).
at::Tensor stacked(const at::Tensor& t, bool bare) {
  if (!bare || !t.defined()) return t;
  c10::SmallVector<int64_t, 4> shape{1};
  shape.append(t.sizes().begin(), t.sizes().end());
  return t.view(shape);
}
OptTensor stacked(const OptTensor& t, bool bare) {
  return bare && t.has_value() ? OptTensor(stacked(*t, bare)) : t;
}
// The other way: t [1, ...] without its leading axis (an empty placeholder stays as it is).
at::Tensor unstacked(const at::Tensor& t, bool bare) {
  return bare && t.defined() && t.dim() > 1 ? t.view(t.sizes().slice(1)) : t;
}

// A call's form: bare weights (w_hh 2-D), and one step (x and h0 2-D, which needs bare
// weights; x 2-D with h0 3-D is a layer call, which fails on x).
struct Form {
  bool bare, step;
};
Form form_of(const at::Tensor& x, const at::Tensor& h0, const OptTensor& c0,
             const at::Tensor& w_hh) {
  const Form f{w_hh.dim() == 2, x.dim() == 2 && h0.dim() == 2};
  TORCH_CHECK(!f.step || (f.bare && (!c0.has_value() || c0->dim() == 2)),
              "fastrnn: a one-step call (x 2-D [B, I], h0 [B, P]) takes c0 [B, H] and one "
              "direction's weights without their [1] axis; got ",
              c0.has_value() ? "c0 " : "no c0", c0.has_value() ? c0->sizes() : at::IntArrayRef(),
              " and w_hh ", w_hh.sizes());
  return f;
}

// fastrnn::forward on these arguments in their form f: bare weights and a one step's
// x, h0, c0 given their [1] axis, and a one step's y, h_n, c_n without it.
ForwardOut forward_stacked(Form f, const std::string& cell, const at::Tensor& x,
                           const at::Tensor& h0, const OptTensor& c0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                           const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                           bool save, const OptTensor& resets, const OptTensor& zoneout_h,
                           const OptTensor& zoneout_c, const OptTensor& rec_mask,
                           bool bf16_gemms) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrnn::forward", "")
                             .typed<decltype(forward_op)>();
  // Here, while the tensors are the caller's: the views below carry no tangent.
  check_no_tangents("fastrnn::forward",
                    {{"x", &x}, {"h0", &h0}, {"c0", opt(c0)}, {"w_ih", &w_ih}, {"w_hh", &w_hh},
                     {"b_ih", opt(b_ih)}, {"b_hh", opt(b_hh)}, {"w_hr", opt(w_hr)}});
  ForwardOut out = op.call(cell, stacked(x, f.step), stacked(h0, f.step), stacked(c0, f.step),
                           stacked(w_ih, f.bare), stacked(w_hh, f.bare), stacked(b_ih, f.bare),
                           stacked(b_hh, f.bare), stacked(w_hr, f.bare), lengths, reverse, save,
                           resets, zoneout_h, zoneout_c, rec_mask, bf16_gemms);
  auto& [y, h_n, c_n, gates, hprev, cprev, m] = out;
  y = unstacked(y, f.step);
  h_n = unstacked(h_n, f.step);
  c_n = unstacked(c_n, f.step);
  return out;
}

struct LayerFunction : public torch::autograd::Function<LayerFunction> {
  // The arguments of fastrnn::forward in its order (without `save`: a recorded call keeps
  // what its backward needs), then the call's form.
  static variable_list forward(AutogradContext* ctx, const std::string& cell,
                               const at::Tensor& x, const at::Tensor& h0, const OptTensor& c0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                               const OptTensor& resets, const OptTensor& zoneout_h,
                               const OptTensor& zoneout_c, const OptTensor& rec_mask,
                               bool bf16_gemms, Form f) {
    ForwardOut out;
    {
      // Straight to the device's kernel; a one step's outputs are then plain aliases of
      // the op's, whose [1]-shaped originals nothing else holds.
      at::AutoDispatchBelowADInplaceOrView guard;
      out = forward_stacked(f, cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                            /*save=*/true, resets, zoneout_h, zoneout_c, rec_mask, bf16_gemms);
    }
    auto& [y, h_n, c_n, gates, hprev, cprev, m] = out;
    // The inputs are kept (references, no copies) for the second-order path.
    ctx->save_for_backward({x, h0, value_or_undefined(c0), w_ih, w_hh, value_or_undefined(b_ih),
                            value_or_undefined(b_hh), value_or_undefined(w_hr),
                            value_or_undefined(lengths), gates, hprev, cprev, m,
                            value_or_undefined(resets), value_or_undefined(zoneout_h),
                            value_or_undefined(zoneout_c), value_or_undefined(rec_mask)});
    // needs_input_grad counts only the tensors given: the edge of each gradient input.
    std::vector<int64_t> edge(kGradInputs, -1);
    const bool given[kGradInputs] = {true, true, c0.has_value(), true, true, b_ih.has_value(),
                                     b_hh.has_value(), w_hr.has_value()};
    for (int k = 0, e = 0; k < kGradInputs; ++k)
      if (given[k]) edge[k] = e++;
    ctx->saved_data["edge"] = edge;
    ctx->saved_data["cell"] = cell;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["bf16_gemms"] = bf16_gemms;
    ctx->saved_data["bare"] = f.bare;
    ctx->saved_data["step"] = f.step;
    ctx->set_materialize_grads(false);  // unused outputs cost no zero-filled gradients
    return {y, h_n, c_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const bool bare = ctx->saved_data["bare"].toBool(), step = ctx->saved_data["step"].toBool();
    const at::Tensor x = stacked(s[0], step), h0 = stacked(s[1], step), c0 = stacked(s[2], step);
    const at::Tensor &lengths = s[8], &gates = s[9], &hprev = s[10], &cprev = s[11], &m = s[12],
                     &resets = s[13], &zoneout_h = s[14], &zoneout_c = s[15],
                     &rec_mask = s[16];
    const at::Tensor w_ih = stacked(s[3], bare), w_hh = stacked(s[4], bare),
                     b_ih = stacked(s[5], bare), b_hh = stacked(s[6], bare),
                     w_hr = stacked(s[7], bare);
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const std::vector<int64_t> edge = ctx->saved_data["edge"].toIntVector();
    std::vector<int64_t> need(kGradInputs);
    for (int k = 0; k < kGradInputs; ++k) need[k] = edge[k] >= 0 && ctx->needs_input_grad(edge[k]);
    const at::Tensor dy = stacked(grads[0], step), dh_n = stacked(grads[1], step),
                     dc_n = stacked(grads[2], step);

    variable_list out(kArguments);  // out[1 + k]: the gradient of gradient input k
    if (at::GradMode::is_enabled()) {
      static const auto graph = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("fastrnn::grad_graph", "")
                                    .typed<std::vector<at::Tensor>(
                                        c10::string_view, const at::Tensor&, const at::Tensor&,
                                        const OptTensor&, const at::Tensor&, const at::Tensor&,
                                        const OptTensor&, const OptTensor&, const OptTensor&,
                                        const OptTensor&, bool, const OptTensor&,
                                        const OptTensor&, const OptTensor&, const OptTensor&,
                                        const OptTensor&, const OptTensor&, const OptTensor&,
                                        c10::IntArrayRef)>();
      const std::vector<at::Tensor> got =
          graph.call(cell, x, h0, optional(c0), w_ih, w_hh, optional(b_ih), optional(b_hh),
                     optional(w_hr), optional(lengths), reverse, optional(resets),
                     optional(zoneout_h), optional(zoneout_c), optional(rec_mask), optional(dy),
                     optional(dh_n), optional(dc_n), need);
      for (int k = 0; k < kGradInputs; ++k)
        if (need[k]) out[1 + k] = got[k];
      return unstacked(out, bare, step);
    }
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastrnn::backward", "")
                               .typed<decltype(backward_op)>();
    BackwardOut grad;
    {
      at::AutoDispatchBelowADInplaceOrView guard;  // nothing to record: straight to the kernel
      grad = op.call(cell, optional(dy), optional(dh_n), optional(dc_n), x, w_ih, w_hh,
                     optional(w_hr), optional(lengths), gates, hprev, cprev, m, reverse,
                     need[0], optional(resets), optional(zoneout_h), optional(zoneout_c),
                     optional(rec_mask), ctx->saved_data["bf16_gemms"].toBool());
    }
    auto& [dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr] = grad;
    const at::Tensor all[kGradInputs] = {dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr};
    for (int k = 0; k < kGradInputs; ++k)
      if (need[k]) out[1 + k] = all[k];
    return unstacked(out, bare, step);
  }

  // The gradients in their inputs' own shapes: a one step's x, h0, c0 (out[1..3]) and bare
  // weights (out[4..8]) without [1].
  static variable_list unstacked(variable_list out, bool bare, bool step) {
    for (int k = 1; k <= 8; ++k) out[k] = fastrnn::unstacked(out[k], k <= 3 ? step : bare);
    return out;
  }
};

using LayerOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Below autograd (inference mode, torch.no_grad in ops.py, or nothing to record) the call is
// fastrnn::forward's, with nothing saved: only y, h_n and c_n come back.
LayerOut plain_forward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0,
                       const OptTensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                       const OptTensor& lengths, bool reverse, bool /*save*/,
                       const OptTensor& resets, const OptTensor& zoneout_h,
                       const OptTensor& zoneout_c, const OptTensor& rec_mask, bool bf16_gemms) {
  // Nothing is recorded below autograd; the one-step form's views are then plain aliases
  // too (the ones on the inputs are only read, those on the outputs alias fresh tensors).
  at::AutoDispatchBelowADInplaceOrView guard;
  const ForwardOut out =
      forward_stacked(form_of(x, h0, c0, w_hh), cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                      lengths, reverse, /*save=*/false, resets, zoneout_h, zoneout_c, rec_mask,
                      bf16_gemms);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

// Records the C++ function when a gradient can flow to one of the inputs (`save` is not
// read: a recorded call keeps what its backward needs, a plain one nothing).
LayerOut autograd_forward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0,
                          const OptTensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                          const OptTensor& lengths, bool reverse, bool save,
                          const OptTensor& resets, const OptTensor& zoneout_h,
                          const OptTensor& zoneout_c, const OptTensor& rec_mask,
                          bool bf16_gemms) {
  auto wants = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  const bool record = at::GradMode::is_enabled() &&
                      (x.requires_grad() || h0.requires_grad() || wants(c0) ||
                       w_ih.requires_grad() || w_hh.requires_grad() || wants(b_ih) ||
                       wants(b_hh) || wants(w_hr));
  if (!record)
    return plain_forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save,
                         resets, zoneout_h, zoneout_c, rec_mask, bf16_gemms);
  variable_list o =
      LayerFunction::apply(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                           resets, zoneout_h, zoneout_c, rec_mask, bf16_gemms,
                           form_of(x, h0, c0, w_hh));
  return {o[0], o[1], o[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, Autograd, m) { m.impl("autograd_forward", &autograd_forward); }

TORCH_LIBRARY_IMPL(fastrnn, CompositeExplicitAutograd, m) {
  m.impl("autograd_forward", &plain_forward);
}

}  // namespace fastrnn
