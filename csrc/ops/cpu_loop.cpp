// CPU backend: the recurrence and GEMM kernels of the instruction set this CPU supports
// best (kernels/cpu/kernels.h), on ATen's thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/cpu/kernels.h"
#include "rnn_op.h"

namespace fastrnn {
namespace {

template <class T>
struct Table;
template <>
struct Table<float> {
  static auto forward(const cpu::Kernels& k) { return k.forward_f32; }
  static auto backward(const cpu::Kernels& k) { return k.backward_f32; }
  static auto gemm(const cpu::Kernels& k) { return k.gemm_f32; }
  static auto column_sum(const cpu::Kernels& k) { return k.column_sum_f32; }
};
template <>
struct Table<double> {
  static auto forward(const cpu::Kernels& k) { return k.forward_f64; }
  static auto backward(const cpu::Kernels& k) { return k.backward_f64; }
  static auto gemm(const cpu::Kernels& k) { return k.gemm_f64; }
  static auto column_sum(const cpu::Kernels& k) { return k.column_sum_f64; }
};

}  // namespace

void cpu_forward_loop(const LoopTensors& a) {
  AT_DISPATCH_FLOATING_TYPES(a.y.scalar_type(), "fastrnn_cpu_forward", [&] {
    ForwardParams<scalar_t> p[2];
    scalar_t* ws[2];
    for (int d = 0; d < a.s.D; ++d) p[d] = forward_params<scalar_t>(a, d);
    const int threads = at::get_num_threads();
    const int64_t n = cpu::forward_workspace(p[0], a.s.G) * threads;
    at::Tensor work = at::empty({a.s.D * n}, a.y.options());
    for (int d = 0; d < a.s.D; ++d) ws[d] = work.mutable_data_ptr<scalar_t>() + d * n;
    Table<scalar_t>::forward(cpu::kernels())(a.s.kind, p, a.s.D, ws, threads);
  });
}

void cpu_backward_loop(const LoopTensors& a) {
  AT_DISPATCH_FLOATING_TYPES(a.dh0.scalar_type(), "fastrnn_cpu_backward", [&] {
    BackwardParams<scalar_t> p[2];
    scalar_t* ws[2];
    for (int d = 0; d < a.s.D; ++d) p[d] = backward_params<scalar_t>(a, d);
    const int threads = at::get_num_threads();
    const int64_t n = cpu::backward_workspace(p[0], a.s.G) * threads;
    at::Tensor work = at::empty({a.s.D * n}, a.dh0.options());
    for (int d = 0; d < a.s.D; ++d) ws[d] = work.mutable_data_ptr<scalar_t>() + d * n;
    Table<scalar_t>::backward(cpu::kernels())(a.s.kind, p, a.s.D, ws, threads);
  });
}

void cpu_matmul_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                    const at::Tensor& bias, bool accumulate) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && out.stride(1) == 1);
  TORCH_INTERNAL_ASSERT(a.size(1) == b.size(0) && out.size(0) == a.size(0) &&
                        out.size(1) == b.size(1));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fastrnn_cpu_matmul", [&] {
    cpu::GemmArgs<scalar_t> g;
    g.M = a.size(0);
    g.N = b.size(1);
    g.K = a.size(1);
    g.a = a.const_data_ptr<scalar_t>();
    g.ars = a.stride(0);
    g.aks = a.stride(1);
    g.b = b.const_data_ptr<scalar_t>();
    g.bk = b.stride(0);
    g.bn = b.stride(1);
    g.beta = accumulate ? 1 : 0;
    g.bias = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    g.c = out.mutable_data_ptr<scalar_t>();
    g.ldc = out.stride(0);
    Table<scalar_t>::gemm(cpu::kernels())(g, at::get_num_threads());
  });
}

void cpu_column_sum_out(at::Tensor& out, const at::Tensor& t, const at::Tensor& u,
                        at::Tensor& out_u) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2 && out.dim() == 1 && out.size(0) == t.size(1) &&
                        out.is_contiguous());
  TORCH_INTERNAL_ASSERT(!u.defined() || (u.sizes() == t.sizes() && u.stride(1) == t.stride(1) &&
                                         out_u.sizes() == out.sizes() && out_u.is_contiguous()));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fastrnn_cpu_column_sum", [&] {
    Table<scalar_t>::column_sum(cpu::kernels())(
        t.const_data_ptr<scalar_t>(), t.size(0), t.size(1), t.stride(0), t.stride(1),
        out.mutable_data_ptr<scalar_t>(), at::get_num_threads(),
        u.defined() ? u.const_data_ptr<scalar_t>() : nullptr, u.defined() ? u.stride(0) : 0,
        u.defined() ? out_u.mutable_data_ptr<scalar_t>() : nullptr);
  });
}

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("forward", &forward_op);
  m.impl("backward", &backward_op);
  m.impl("ln_forward", &ln_forward_op);
  m.impl("ln_backward", &ln_backward_op);
  m.impl("mm", &mm_op);
}

}  // namespace fastrnn
