#include "rnn_op.h"
#include "saved_memory.h"

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <atomic>
#include <cstring>

namespace fastrnn {

namespace {
std::atomic<bool> g_cuda_persistent{false};
std::atomic<int64_t> g_cuda_persistent_runs{0};
}  // namespace

bool cuda_persistent() { return g_cuda_persistent.load(); }
void set_cuda_persistent(bool on) { g_cuda_persistent.store(on); }
int64_t cuda_persistent_runs() { return g_cuda_persistent_runs.load(); }
void count_cuda_persistent_run() { ++g_cuda_persistent_runs; }
namespace {

at::Tensor contig(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Flat indices t * B + b of the valid (unpadded) rows, when skipping the others makes the
// large GEMMs worth a gather: host-side lengths only (no device sync) and at least 10% of
// the rows padded. Undefined otherwise.
at::Tensor valid_rows(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  const at::Tensor* len = opt(lengths);
  if (!len || len->is_cuda() || T * B == 0) return at::Tensor();
  const at::Tensor mask = at::arange(T, len->options()).unsqueeze(1) < len->unsqueeze(0);
  const at::Tensor rows = mask.view({-1}).nonzero().view({-1});
  return rows.size(0) * 10 < T * B * 9 ? rows : at::Tensor();
}

// Scratch tensors for the large temporaries of one call (gx, dgx, dgh), reused per calling
// thread on the CPU: a fresh tensor over glibc's mmap threshold (32 MB) comes back as new
// pages that the OS zero-fills on first touch, every call (about 10 ms per 50 MB here).
// Never returned to the caller. On CUDA, torch's caching allocator already reuses memory.
// Each call wraps the memory in a tensor of its own, so the tensor belongs to the call's
// mode (an inference tensor under torch.inference_mode, a normal one otherwise).
// release_scratch() frees the calling thread's blocks (fastrnn.empty_cache()).
enum Scratch { kGx, kGx16, kDgx, kDgh, kBf16A, kBf16B, kBf16Product, kBf16Dgx, kScratchSlots };
thread_local at::Tensor t_scratch[kScratchSlots];  // the memory only, per slot
at::Tensor scratch(Scratch slot, at::IntArrayRef shape, const at::TensorOptions& opts) {
  if (opts.device().is_cuda()) return at::empty(shape, opts);
  at::Tensor& t = t_scratch[slot];
  const int64_t n = c10::multiply_integers(shape);
  if (!t.defined() || t.dtype() != opts.dtype() || t.numel() < n) {
    t = at::Tensor();  // free the old block first
    t = at::empty({n}, opts);
  }
  return at::from_blob(t.data_ptr(), shape, opts);
}

// t in bfloat16, as an operand of the bfloat16 GEMMs: t itself when it already is, else a
// copy in `slot`'s scratch memory (a transposed view stays one, over a copy of its base).
at::Tensor bf16_operand(const at::Tensor& t, Scratch slot) {
  if (t.scalar_type() == at::kBFloat16) return t;
  const bool transposed = t.dim() == 2 && t.stride(0) == 1 && t.size(1) > 1;
  const at::Tensor src = transposed ? t.t() : t;
  at::Tensor copy = scratch(slot, src.sizes(), src.options().dtype(at::kBFloat16)).copy_(src);
  return transposed ? copy.t() : copy;
}

// out [M, N] (float32, contiguous) = c16 [M, N] (bfloat16, contiguous) widened (+ bias
// [N], float32), in one pass over the rows on torch's threads. The same values as
// at::add_out(out, c16, bias), a mixed-dtype TensorIterator loop that took 504 us at
// 1600 x 1024 on Zen 4, where a plain copy of the same bytes takes 155 us.
void widen_out(at::Tensor& out, const at::Tensor& c16, const at::Tensor& bias) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.scalar_type() == at::kFloat &&
                        c16.is_contiguous() && out.sizes() == c16.sizes());
  const int64_t M = c16.size(0), N = c16.size(1);
  const at::Tensor b = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  const uint16_t* src = reinterpret_cast<const uint16_t*>(c16.data_ptr<at::BFloat16>());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(N, 1)),
                   [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint16_t* row = src + m * N;
      float* o = dst + m * N;
      for (int64_t n = 0; n < N; ++n) {
        const uint32_t bits = static_cast<uint32_t>(row[n]) << 16;  // bf16 is float's top half
        float v;
        std::memcpy(&v, &bits, sizeof(v));
        o[n] = bp ? v + bp[n] : v;
      }
    }
  });
}

// a [M, K] @ b [K, N] (+ bias [N]) into out [M, N] (a new tensor when undefined): on the
// CPU fastrnn's own GEMM (any strides, so transposed views cost no copy; the same bits for
// any thread count and the same speed on any vendor's CPU), on CUDA ATen's (cuBLAS).
// bf16: a float32 GEMM with bfloat16 operands (CPU autocast on a CPU with bf16 dot
// products): ATen's bfloat16 matmul, oneDNN's AMX or AVX512_BF16 kernels, the product
// rounded to bfloat16 as torch's own autocast matmuls are, the result in float32. Only
// from 2^24 multiply-adds (below, the casts cost more than the faster products save:
// measured at 100 x 256 x 256: 58 us against 41 us for fastrnn's float32 GEMM), or when
// the caller passes an operand already in bfloat16 (one copy shared by several GEMMs).
// The bfloat16 copies and the product live in scratch memory: fresh blocks of this size
// cost more in page faults than the copies themselves.
constexpr int64_t kMinBf16Gemm = int64_t(1) << 24;
bool takes_bf16(const at::Tensor& a, const at::Tensor& b, bool bf16) {
  const bool given16 = a.scalar_type() == at::kBFloat16 || b.scalar_type() == at::kBFloat16;
  return !a.is_cuda() && (given16 || (bf16 && a.size(0) * a.size(1) * b.size(1) >= kMinBf16Gemm));
}
// The bfloat16 product a b of those GEMMs, in scratch memory (kBf16Product).
at::Tensor bf16_product(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor a16 = bf16_operand(a, kBf16A), b16 = bf16_operand(b, kBf16B);
  at::Tensor c16 = scratch(kBf16Product, {a.size(0), b.size(1)}, a16.options());
  at::mm_out(c16, a16, b16);
  return c16;
}
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {},
                at::Tensor out = {}, bool bf16 = false) {
  if (takes_bf16(a, b, bf16)) {
    const at::Tensor c16 = bf16_product(a, b);
    if (!out.defined()) out = pooled_empty(c16.sizes(), c16.options().dtype(at::kFloat));
    widen_out(out, c16, bias);
    return out;
  }
  if (a.is_cuda()) {
    if (!out.defined()) return bias.defined() ? at::addmm(bias, a, b) : at::mm(a, b);
    return bias.defined() ? at::addmm_out(out, bias, a, b) : at::mm_out(out, a, b);
  }
  if (!out.defined()) out = pooled_empty({a.size(0), b.size(1)}, a.options());
  cpu_matmul_out(out, a, b, bias.defined() ? bias.contiguous() : bias, false);
  return out;
}

// Column sums of t [N, C] (the bias gradients), rows summed in order on the CPU so the
// result is the same whatever the thread count.
at::Tensor column_sum(const at::Tensor& t) {
  if (t.is_cuda()) return t.sum(0);
  at::Tensor out = at::empty({t.size(1)}, t.options()), none;
  cpu_column_sum_out(out, t, at::Tensor(), none);
  return out;
}

// (column sums of t, column sums of t * u) for t, u [N, C], in one pass on the CPU.
std::pair<at::Tensor, at::Tensor> column_sums(const at::Tensor& t, const at::Tensor& u) {
  if (t.is_cuda()) return {t.sum(0), (t * u).sum(0)};
  at::Tensor out = at::empty({t.size(1)}, t.options()), out_u = at::empty_like(out);
  cpu_column_sum_out(out, t, u, out_u);
  return {out, out_u};
}

// The optional per-step arguments of every op (resets, zoneout weights, recurrent dropout
// mask): their checks against x and the sizes s, and their contiguous copies for the loop.
void check_extras(const Shapes& s, const at::Tensor& x, const c10::optional<at::Tensor>& resets,
                  const c10::optional<at::Tensor>& zoneout_h,
                  const c10::optional<at::Tensor>& zoneout_c,
                  const c10::optional<at::Tensor>& rec_mask) {
  check_resets(resets, x, s);
  check_zoneout(zoneout_h, zoneout_c, x, s);
  check_rec_mask(rec_mask, x, s);
}
void set_extras(LoopTensors& a, const c10::optional<at::Tensor>& lengths,
                const c10::optional<at::Tensor>& resets,
                const c10::optional<at::Tensor>& zoneout_h,
                const c10::optional<at::Tensor>& zoneout_c,
                const c10::optional<at::Tensor>& rec_mask) {
  a.lengths = contig(lengths);
  a.resets = contig(resets);
  a.zoneout_h = contig(zoneout_h);
  a.zoneout_c = contig(zoneout_c);
  a.rec_mask = contig(rec_mask);
}

// The rows of `t` (dim 0 of a [T*B, n] view, or dim 1 of [D, T*B, n]) that are valid.
at::Tensor take(const at::Tensor& t, const at::Tensor& rows, int64_t dim) {
  return rows.defined() ? t.index_select(dim, rows) : t;
}

}  // namespace

void release_scratch() {
  for (at::Tensor& t : t_scratch) t = at::Tensor();
}

int64_t scratch_bytes() {
  int64_t n = 0;
  for (const at::Tensor& t : t_scratch) n += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
  return n;
}

ForwardOut forward_op(const std::string& cell, const at::Tensor& x_, const at::Tensor& h0,
                      const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                      const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
                      const c10::optional<at::Tensor>& lengths, bool reverse, bool save,
                      const c10::optional<at::Tensor>& resets,
                      const c10::optional<at::Tensor>& zoneout_h,
                      const c10::optional<at::Tensor>& zoneout_c,
                      const c10::optional<at::Tensor>& rec_mask, bool bf16_gemms) {
  const Shapes s = check_forward(cell, x_, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_extras(s, x_, resets, zoneout_h, zoneout_c, rec_mask);
  check_no_tangents("fastrnn::forward",
                    {{"x", &x_}, {"h0", &h0}, {"c0", opt(c0)}, {"w_ih", &w_ih}, {"w_hh", &w_hh},
                     {"b_ih", opt(b_ih)}, {"b_hh", opt(b_hh)}, {"w_hr", opt(w_hr)},
                     {"zoneout_h", opt(zoneout_h)}, {"zoneout_c", opt(zoneout_c)},
                     {"rec_mask", opt(rec_mask)}});
  // The dtype was settled before the op (ops.py's autocast kernel); the GEMMs inside keep it.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool lstm = s.kind == CellKind::LSTM;
  if (lengths.has_value() && !x_.is_cuda()) check_length_values(*lengths, s.T);

  LoopTensors a;
  a.s = s;
  a.reverse = reverse;
  const at::Tensor x = x_.contiguous();
  a.y = pooled_empty({s.T, s.B, s.D * s.P}, x.options());  // directions side by side
  a.h_n = at::empty({s.D, s.B, s.P}, x.options());
  a.c_n = lstm ? at::empty({s.D, s.B, s.H}, x.options()) : empty0(x);
  a.gates = save ? pooled_empty({s.D, s.T, s.B, s.S * s.H}, x.options()) : empty0(x);
  a.hprev = save ? pooled_empty({s.D, s.T, s.B, s.P}, x.options()) : empty0(x);
  a.cprev = save && lstm ? pooled_empty({s.D, s.T, s.B, s.H}, x.options()) : empty0(x);
  a.m = save && s.proj ? pooled_empty({s.D, s.T, s.B, s.H}, x.options()) : empty0(x);
  ForwardOut out{a.y, a.h_n, a.c_n, a.gates, a.hprev, a.cprev, a.m};
  if (s.B == 0) return out;
  if (s.T == 0) {
    a.h_n.copy_(h0);
    if (lstm) a.c_n.copy_(*c0);
    return out;
  }

  // One large GEMM for the input projection of every step and direction, over the valid
  // rows only when many are padded (the loop never reads gx of a padded row).
  const at::Tensor x2 = x.view({s.T * s.B, s.I});
  const at::Tensor w_ih2 = w_ih.reshape({s.D * s.G * s.H, s.I});
  const at::Tensor rows = valid_rows(lengths, s.T, s.B);
  const at::Tensor xv = take(x2, rows, 0);
  const at::Tensor bias = opt(b_ih) ? b_ih->reshape({-1}) : at::Tensor();
  if (takes_bf16(xv, w_ih2.t(), bf16_gemms) && x.scalar_type() == at::kFloat) {
    // The kernel reads the bfloat16 product and adds b_ih itself (ForwardParams::gx16):
    // the values of widen_out, without writing and reading them back in float32.
    const at::Tensor c16 = bf16_product(xv, w_ih2.t());
    a.gx16 = rows.defined()
                 ? scratch(kGx16, {s.T * s.B, w_ih2.size(0)}, c16.options()).index_copy_(0, rows, c16)
                 : c16;
    a.gx16_bias = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  } else {
    a.gx = scratch(kGx, {s.T * s.B, w_ih2.size(0)}, x.options());
    if (rows.defined())
      a.gx.index_copy_(0, rows, gemm(xv, w_ih2.t(), bias, {}, bf16_gemms));
    else
      gemm(xv, w_ih2.t(), bias, a.gx, bf16_gemms);
  }
  a.w_hh = w_hh.contiguous();
  a.b_hh = contig(b_hh);
  a.w_hr = contig(w_hr);
  a.h0 = h0.contiguous();
  a.c0 = contig(c0);
  a.bf16_step = bf16_gemms && !x.is_cuda();
  set_extras(a, lengths, resets, zoneout_h, zoneout_c, rec_mask);
  if (x.is_cuda())
    cuda_forward_loop(a);
  else
    cpu_forward_loop(a);
  return out;
}

ForwardOut ln_forward_op(const std::string& cell, const at::Tensor& gx_, const at::Tensor& h0,
                         const c10::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                         const c10::optional<at::Tensor>& b_hh, const at::Tensor& ln_w,
                         const at::Tensor& ln_b, const c10::optional<at::Tensor>& lnc_w,
                         const c10::optional<at::Tensor>& lnc_b, const at::Tensor& gx_w,
                         const at::Tensor& gx_b, const c10::optional<at::Tensor>& lengths,
                         bool reverse, bool save,
                         double eps, const c10::optional<at::Tensor>& resets,
                         const c10::optional<at::Tensor>& zoneout_h,
                         const c10::optional<at::Tensor>& zoneout_c,
                         const c10::optional<at::Tensor>& rec_mask) {
  const Shapes s = check_ln(cell, gx_, w_hh, ln_w, lnc_w, lnc_b);
  check_no_tangents("fastrnn::ln_forward",
                    {{"gx", &gx_}, {"h0", &h0}, {"c0", opt(c0)}, {"w_hh", &w_hh},
                     {"b_hh", opt(b_hh)}, {"ln_w", &ln_w}, {"ln_b", &ln_b}, {"lnc_w", opt(lnc_w)},
                     {"lnc_b", opt(lnc_b)}, {"gx_w", &gx_w}, {"gx_b", &gx_b},
                     {"zoneout_h", opt(zoneout_h)}, {"zoneout_c", opt(zoneout_c)},
                     {"rec_mask", opt(rec_mask)}});
  check_gate_vector(s, gx_, ln_b, "ln_b");
  check_gate_vector(s, gx_, gx_w, "gx_w");
  check_gate_vector(s, gx_, gx_b, "gx_b");
  check_gate_vector(s, gx_, b_hh, "b_hh");
  check_state(s, gx_, h0, c0, lengths);
  TORCH_CHECK(eps > 0, "fastrnn: eps must be positive, got ", eps);
  check_extras(s, gx_, resets, zoneout_h, zoneout_c, rec_mask);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool lstm = s.kind == CellKind::LSTM;
  // As forward_op: host-side lengths only (device-side ones are read unchecked, no sync).
  if (lengths.has_value() && !gx_.is_cuda()) check_length_values(*lengths, s.T);

  LoopTensors a;
  a.s = s;
  a.reverse = reverse;
  a.eps = eps;
  const at::TensorOptions o = gx_.options();
  a.y = pooled_empty({s.T, s.B, s.D * s.H}, o);
  a.h_n = at::empty({s.D, s.B, s.H}, o);
  a.c_n = lstm ? at::empty({s.D, s.B, s.H}, o) : empty0(gx_);
  a.gates = save ? pooled_empty({s.D, s.T, s.B, s.S * s.H}, o) : empty0(gx_);
  a.hprev = save ? pooled_empty({s.D, s.T, s.B, s.H}, o) : empty0(gx_);
  a.cprev = save && lstm ? pooled_empty({s.D, s.T, s.B, s.H}, o) : empty0(gx_);
  a.ln_rstd = save ? at::zeros({s.D, s.T, s.B, 2}, o) : empty0(gx_);
  ForwardOut out{a.y, a.h_n, a.c_n, a.gates, a.hprev, a.cprev, a.ln_rstd};
  if (s.B == 0) return out;
  if (s.T == 0) {
    a.h_n.copy_(h0);
    if (lstm) a.c_n.copy_(*c0);
    return out;
  }
  a.gx = gx_.contiguous();
  a.w_hh = w_hh.contiguous();
  a.b_hh = contig(b_hh);
  a.ln_w = ln_w.contiguous();
  a.ln_b = ln_b.contiguous();
  a.gx_w = gx_w.contiguous();
  a.gx_b = gx_b.contiguous();
  a.lnc_w = contig(lnc_w);
  a.lnc_b = contig(lnc_b);
  a.h0 = h0.contiguous();
  a.c0 = contig(c0);
  set_extras(a, lengths, resets, zoneout_h, zoneout_c, rec_mask);
  if (gx_.is_cuda())
    cuda_forward_loop(a);
  else
    cpu_forward_loop(a);
  return out;
}

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
                           const c10::optional<at::Tensor>& rec_mask) {
  const Shapes s = check_ln(cell, gx, w_hh, ln_w, lnc_w, lnc_b);
  check_saved_state(s, gx, gates, hprev);
  for (auto [v, name] : {std::make_pair(&gx_w, "gx_w"), std::make_pair(&gx_b, "gx_b"),
                         std::make_pair(&ln_b, "ln_b")})
    check_gate_vector(s, gx, *v, name);
  check_gate_vector(s, gx, b_hh, "b_hh");
  auto def = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
  check_backward_rest(s, gx, def(dy), def(dh_n), def(dc_n), def(lengths), cprev, at::Tensor());
  if (s.T * s.B > 0) {
    TORCH_CHECK(ln_rstd.sizes() == at::IntArrayRef({s.D, s.T, s.B, 2}) &&
                    ln_rstd.scalar_type() == gx.scalar_type() && ln_rstd.device() == gx.device(),
                "fastrnn: ln_rstd must be forward's [", s.D, ", ", s.T, ", ", s.B, ", 2] ",
                gx.scalar_type(), " tensor on ", gx.device(), ", got ", ln_rstd.sizes());
  }
  if (const at::Tensor* len = opt(lengths); len && len->is_cpu()) check_length_values(*len, s.T);
  check_extras(s, gx, resets, zoneout_h, zoneout_c, rec_mask);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool lstm = s.kind == CellKind::LSTM;
  const int64_t GH = s.G * s.H, DGH = s.D * GH, TB = s.T * s.B;
  const at::TensorOptions o = gx.options();

  LoopTensors a;
  a.s = s;
  a.reverse = reverse;
  a.dh_n = contig(dh_n);
  a.dc_n = contig(dc_n);
  auto state_grad = [&](const at::Tensor& g) {
    if (TB > 0) return at::empty({s.D, s.B, s.H}, o);
    return g.defined() ? g.clone() : at::zeros({s.D, s.B, s.H}, o);
  };
  a.dh0 = state_grad(a.dh_n);
  a.dc0 = lstm ? state_grad(a.dc_n) : empty0(gx);
  a.dgx = pooled_empty({s.T, s.B, DGH}, o);  // returned: a tensor of its own
  a.dgh = lstm ? a.dgx : scratch(kDgh, {s.T, s.B, DGH}, o);
  a.draw = scratch(kDgx, {s.T, s.B, DGH}, o);
  a.dlnc = lstm ? at::empty({s.D, s.T, s.B, s.H}, o) : empty0(gx);
  a.gx = gx.contiguous();
  if (TB > 0) {
    a.gx_w = gx_w.contiguous();
    a.gx_b = gx_b.contiguous();
    a.b_hh = contig(b_hh);
    a.ln_b = ln_b.contiguous();
    a.w_hh = w_hh.contiguous();
    a.ln_w = ln_w.contiguous();
    a.lnc_w = contig(lnc_w);
    a.lnc_b = contig(lnc_b);
    a.ln_rstd = ln_rstd.contiguous();
    set_extras(a, lengths, resets, zoneout_h, zoneout_c, rec_mask);
    a.dy = contig(dy);
    a.gates = gates.contiguous();
    a.hprev = hprev.contiguous();
    a.cprev = cprev.contiguous();
    if (gx.is_cuda())
      cuda_backward_loop(a);
    else
      cpu_backward_loop(a);
  }

  // Parameter gradients as large GEMMs and column sums over all steps at once. W_hh saw
  // h * rec_mask (recurrent dropout); hprev holds h itself.
  const at::Tensor* mask = opt(rec_mask);
  const at::Tensor hrec = mask && TB > 0 ? hprev.view({s.D, s.T, s.B, s.H}) * mask->unsqueeze(1)
                                         : hprev.contiguous();
  // The saved norms of a direction: [T*B, G*H] (LN_hh) and [T*B, H] (LN_c) views, row
  // stride S*H; zeros with no step.
  const at::Tensor saved =
      TB > 0 ? a.gates.view({s.D, TB, s.S * s.H}) : at::zeros({s.D, 1, s.S * s.H}, o);
  const at::Tensor gx2 = a.gx.view({TB, DGH});
  const at::Tensor dgx2 = a.dgx.view({TB, DGH});
  std::vector<at::Tensor> dw_hh, db_hh, dln_w, dlnc_w, dlnc_b;
  for (int64_t d = 0; d < s.D; ++d) {
    const at::Tensor dr = a.draw.view({TB, DGH}).narrow(1, d * GH, GH);
    const at::Tensor dg = a.dgh.view({TB, DGH}).narrow(1, d * GH, GH);
    const at::Tensor sv = saved[d].narrow(0, 0, TB);
    dw_hh.push_back(gemm(dr.t(), hrec.view({s.D, TB, s.H})[d]));
    auto [db, dw] = column_sums(dg, sv.narrow(1, 0, GH));
    db_hh.push_back(db);
    dln_w.push_back(dw);
    if (lstm) {
      auto [dcb, dcw] = column_sums(a.dlnc[d].view({TB, s.H}),
                                    sv.narrow(1, LnLstm::kNormC * s.H, s.H));
      dlnc_w.push_back(dcw);
      dlnc_b.push_back(dcb);
    }
  }
  // LN_ih's affine: gradients of gx_w and gx_b, then dgx becomes w.r.t. gx itself.
  auto [dgx_b, dgx_w] = column_sums(dgx2, gx2);
  a.dgx.view({TB, s.D, GH}).mul_(gx_w);
  return {a.dgx, a.dh0, a.dc0, at::stack(dw_hh), at::stack(db_hh), at::stack(dln_w),
          lstm ? at::stack(dlnc_w) : empty0(gx), lstm ? at::stack(dlnc_b) : empty0(gx),
          dgx_w.view({s.D, GH}), dgx_b.view({s.D, GH})};
}

at::Tensor mm_op(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "fastrnn::mm: expected 2-D tensors, got ", a.dim(),
              "-D and ", b.dim(), "-D");
  TORCH_CHECK(a.size(1) == b.size(0), "fastrnn::mm: shapes ", a.sizes(), " and ", b.sizes(),
              " cannot be multiplied");
  TORCH_CHECK(a.dtype() == b.dtype(), "fastrnn::mm: dtypes differ: ", a.dtype(), " and ",
              b.dtype());
  TORCH_CHECK(a.device() == b.device(), "fastrnn::mm: devices differ: ", a.device(), " and ",
              b.device());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "fastrnn::mm: unsupported dtype ", a.dtype(), " (float32 and float64 only)");
  check_no_tangents("fastrnn::mm", {{"a", &a}, {"b", &b}});
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return gemm(a, b);
}

BackwardOut backward_op(const std::string& cell, const c10::optional<at::Tensor>& dy,
                        const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n,
                        const at::Tensor& x_, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const c10::optional<at::Tensor>& w_hr,
                        const c10::optional<at::Tensor>& lengths, const at::Tensor& gates,
                        const at::Tensor& hprev, const at::Tensor& cprev, const at::Tensor& m,
                        bool reverse, bool input_grad,
                        const c10::optional<at::Tensor>& resets,
                        const c10::optional<at::Tensor>& zoneout_h,
                        const c10::optional<at::Tensor>& zoneout_c,
                        const c10::optional<at::Tensor>& rec_mask, bool bf16_gemms) {
  const Shapes s = check_backward(cell, dy, dh_n, dc_n, x_, w_ih, w_hh, w_hr, lengths, gates,
                                  hprev, cprev, m);
  check_extras(s, x_, resets, zoneout_h, zoneout_c, rec_mask);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool lstm = s.kind == CellKind::LSTM;
  const int64_t GH = s.G * s.H, DGH = s.D * GH, TB = s.T * s.B;
  const at::Tensor x = x_.contiguous();

  LoopTensors a;
  a.s = s;
  a.reverse = reverse;
  a.dh_n = contig(dh_n);
  a.dc_n = contig(dc_n);
  // With no step to run, the gradient reaches h0/c0 unchanged; else the loop writes them.
  auto state_grad = [&](const at::Tensor& g, int64_t n) {
    if (TB > 0) return at::empty({s.D, s.B, n}, x.options());
    return g.defined() ? g.clone() : at::zeros({s.D, s.B, n}, x.options());
  };
  a.dh0 = state_grad(a.dh_n, s.P);
  a.dc0 = lstm ? state_grad(a.dc_n, s.H) : empty0(x);
  a.dgx = scratch(kDgx, {s.T, s.B, DGH}, x.options());  // directions side by side, like gx
  a.dgh = s.kind == CellKind::GRU ? scratch(kDgh, {s.T, s.B, DGH}, x.options()) : a.dgx;
  a.dhtot = s.proj ? at::empty({s.D, s.T, s.B, s.P}, x.options()) : empty0(x);
  if (TB > 0) {
    a.w_hh = w_hh.contiguous();
    a.w_hr = contig(w_hr);
    set_extras(a, lengths, resets, zoneout_h, zoneout_c, rec_mask);
    a.dy = contig(dy);
    a.gates = gates.contiguous();
    a.hprev = hprev.contiguous();
    a.cprev = cprev.contiguous();
    a.bf16_step = bf16_gemms && !x.is_cuda();
    if (x.is_cuda())
      cuda_backward_loop(a);
    else
      cpu_backward_loop(a);
  }

  // Weight gradients as large GEMMs over all steps at once (over the valid rows only when
  // many are padded: padded rows have zero gate gradients); the input side covers both
  // directions in one GEMM.
  const at::Tensor rows = valid_rows(lengths, s.T, s.B);
  const int64_t N = rows.defined() ? rows.size(0) : TB;
  const at::Tensor dgx = take(a.dgx.view({TB, DGH}), rows, 0);             // [N, D*G*H]
  const at::Tensor dgh = s.kind == CellKind::GRU
                             ? take(a.dgh.view({TB, DGH}), rows, 0).view({N, s.D, GH})
                             : dgx.view({N, s.D, GH});                     // [N, D, G*H]
  const at::Tensor xv = take(x.view({TB, s.I}), rows, 0);
  // Under bf16 GEMMs dgx feeds dx, dW_ih and (but for GRU) dW_hh: rounded once for all.
  const at::Tensor dgx16 =
      bf16_gemms && !x.is_cuda() && N * DGH * s.I >= kMinBf16Gemm ? bf16_operand(dgx, kBf16Dgx)
                                                                    : dgx;
  const at::Tensor dgh16 = s.kind == CellKind::GRU ? dgh : dgx16.view({N, s.D, GH});
  at::Tensor dx = empty0(x);
  if (input_grad) {
    const at::Tensor dxv = gemm(dgx16, w_ih.reshape({DGH, s.I}), {}, {}, bf16_gemms);
    dx = rows.defined() ? at::zeros({TB, s.I}, x.options()).index_copy_(0, rows, dxv) : dxv;
    dx = dx.view({s.T, s.B, s.I});
  }
  at::Tensor dw_ih = gemm(dgx16.t(), xv, {}, {}, bf16_gemms).view({s.D, GH, s.I});
  // W_hh saw h * rec_mask (recurrent dropout); hprev holds h itself.
  const at::Tensor* mask = opt(rec_mask);
  const at::Tensor hrec = mask && TB > 0 ? hprev.view({s.D, s.T, s.B, s.P}) * mask->unsqueeze(1)
                                         : hprev.contiguous();
  const at::Tensor hp = take(hrec.view({s.D, TB, s.P}), rows, 1);
  const at::Tensor mv = s.proj ? take(m.contiguous().view({s.D, TB, s.H}), rows, 1) : at::Tensor();
  const at::Tensor dht = s.proj ? take(a.dhtot.view({s.D, TB, s.P}), rows, 1) : at::Tensor();
  // Each direction's weight gradients straight into its slice of the result.
  at::Tensor dw_hh = pooled_empty({s.D, GH, s.P}, x.options());
  at::Tensor dw_hr = s.proj ? pooled_empty({s.D, s.P, s.H}, x.options()) : empty0(x);
  std::vector<at::Tensor> db_hh_d;
  for (int64_t d = 0; d < s.D; ++d) {
    const at::Tensor g = dgh.select(1, d);  // [N, G*H], a strided view
    gemm(dgh16.select(1, d).t(), hp[d], {}, dw_hh[d], bf16_gemms);
    if (s.kind == CellKind::GRU) db_hh_d.push_back(column_sum(g));
    if (s.proj) gemm(dht[d].t(), mv[d], {}, dw_hr[d], bf16_gemms);
  }
  at::Tensor db_ih = column_sum(dgx).view({s.D, GH});
  at::Tensor db_hh = s.kind == CellKind::GRU ? at::stack(db_hh_d) : db_ih.clone();  // same sum otherwise
  return {dx, a.dh0, a.dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr};
}

}  // namespace fastrnn
