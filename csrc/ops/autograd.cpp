// fastrnn::autograd_forward: fastrnn::forward with its derivative in C++, for eager calls
// that record autograd (python/fastrnn/ops.py: _run). A C++ autograd Function costs a
// few microseconds a call where a Python autograd.Function (and the formula registered
// in ops.py, which traced calls keep: torch.compile, export) costs tens. Both take the
// first-order gradients from fastrnn::backward. When the backward is itself recorded
// (create_graph=True: double backward), they come from fastrnn::grad_graph instead,
// which ops.py implements as a differentiable per-step recomputation of the layer.
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
// Arguments of fastrnn::forward, `cell` included: backward returns one entry per argument.
constexpr int kArguments = 17;

at::Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// One direction's weights (w_ih, w_hh, b_ih, b_hh, w_hr) may come bare, without their
// leading [1] axis: the parameters themselves, which spares autograd a view node for each
// in every call. `bare` (w_hh is 2-D) gives them that axis for fastrnn::forward/backward,
// and takes it off their gradients.
at::Tensor stacked(const at::Tensor& w, bool bare) {
  return bare && w.defined() ? w.unsqueeze(0) : w;
}
OptTensor stacked(const OptTensor& w, bool bare) {
  return bare && w.has_value() ? OptTensor(w->unsqueeze(0)) : w;
}

// fastrnn::forward on these arguments, bare weights given their [1] axis.
ForwardOut forward_stacked(const std::string& cell, const at::Tensor& x, const at::Tensor& h0,
                           const OptTensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                           const OptTensor& lengths, bool reverse, bool save,
                           const OptTensor& resets, const OptTensor& zoneout_h,
                           const OptTensor& zoneout_c, const OptTensor& rec_mask,
                           bool bf16_gemms) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastrnn::forward", "")
                             .typed<decltype(forward_op)>();
  const bool bare = w_hh.dim() == 2;
  return op.call(cell, x, h0, c0, stacked(w_ih, bare), stacked(w_hh, bare), stacked(b_ih, bare),
                 stacked(b_hh, bare), stacked(w_hr, bare), lengths, reverse, save, resets,
                 zoneout_h, zoneout_c, rec_mask, bf16_gemms);
}

struct LayerFunction : public torch::autograd::Function<LayerFunction> {
  static variable_list forward(AutogradContext* ctx, const std::string& cell, const at::Tensor& x,
                               const at::Tensor& h0, const OptTensor& c0, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                               bool save, const OptTensor& resets, const OptTensor& zoneout_h,
                               const OptTensor& zoneout_c, const OptTensor& rec_mask,
                               bool bf16_gemms) {
    ForwardOut out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;  // straight to the device's kernel
      out = forward_stacked(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                            save, resets, zoneout_h, zoneout_c, rec_mask, bf16_gemms);
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
    ctx->saved_data["bare"] = w_hh.dim() == 2;
    ctx->set_materialize_grads(false);  // unused outputs cost no zero-filled gradients
    return {y, h_n, c_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const bool bare = ctx->saved_data["bare"].toBool();
    const at::Tensor &x = s[0], &h0 = s[1], &c0 = s[2], &lengths = s[8], &gates = s[9],
                     &hprev = s[10], &cprev = s[11], &m = s[12], &resets = s[13],
                     &zoneout_h = s[14], &zoneout_c = s[15], &rec_mask = s[16];
    const at::Tensor w_ih = stacked(s[3], bare), w_hh = stacked(s[4], bare),
                     b_ih = stacked(s[5], bare), b_hh = stacked(s[6], bare),
                     w_hr = stacked(s[7], bare);
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const std::vector<int64_t> edge = ctx->saved_data["edge"].toIntVector();
    std::vector<int64_t> need(kGradInputs);
    for (int k = 0; k < kGradInputs; ++k) need[k] = edge[k] >= 0 && ctx->needs_input_grad(edge[k]);
    const at::Tensor &dy = grads[0], &dh_n = grads[1], &dc_n = grads[2];

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
      return unstacked(out, bare);
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
    return unstacked(out, bare);
  }

  // The weights' gradients (out[4..8]) in the weights' own shapes: bare ones without [1].
  static variable_list unstacked(variable_list out, bool bare) {
    if (bare)
      for (int k = 4; k <= 8; ++k)
        if (out[k].defined()) out[k] = out[k].squeeze(0);
    return out;
  }
};

using LayerOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

LayerOut autograd_forward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0,
                          const OptTensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                          const OptTensor& lengths, bool reverse, bool save,
                          const OptTensor& resets, const OptTensor& zoneout_h,
                          const OptTensor& zoneout_c, const OptTensor& rec_mask,
                          bool bf16_gemms) {
  variable_list o = LayerFunction::apply(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                         reverse, save, resets, zoneout_h, zoneout_c, rec_mask,
                                         bf16_gemms);
  return {o[0], o[1], o[2]};
}

// Below autograd (inference mode, torch.no_grad in ops.py) the call is fastrnn::forward's.
LayerOut plain_forward(const std::string& cell, const at::Tensor& x, const at::Tensor& h0,
                       const OptTensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                       const OptTensor& lengths, bool reverse, bool save,
                       const OptTensor& resets, const OptTensor& zoneout_h,
                       const OptTensor& zoneout_c, const OptTensor& rec_mask, bool bf16_gemms) {
  const ForwardOut out = forward_stacked(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                         reverse, save, resets, zoneout_h, zoneout_c, rec_mask,
                                         bf16_gemms);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, Autograd, m) { m.impl("autograd_forward", &autograd_forward); }

TORCH_LIBRARY_IMPL(fastrnn, CompositeExplicitAutograd, m) {
  m.impl("autograd_forward", &plain_forward);
}

}  // namespace fastrnn
