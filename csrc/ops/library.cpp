// The one schema block of the fastrnn ops, and the Python module entry point.
//
// forward runs one layer, all its directions (D = 1 or 2, stacked on a leading axis of
// every per-direction argument; shapes in python/fastrnn/ops.py); its last four outputs are
// what backward needs (empty when save=False). resets: bool [T, B] episode starts, the
// rule in kernels/params.h (reset_before); zoneout_h [D, T, B, P], zoneout_c [D, T, B, H]:
// zoneout's weights of the previous state; rec_mask [D, B, P]: recurrent dropout's mask on
// the h feeding W_hh (params.h). backward takes the same tensors. bf16_gemms: the large
// GEMMs (input projection, dx, weight gradients) take bfloat16 operands (CPU autocast on
// a CPU with bf16 dot products); the recurrence stays in the tensors' dtype. Cells: 'lstm', 'gru', 'rnn_tanh', 'rnn_relu'.
// Outputs a cell does not have (c_n for GRU/RNN, m without a projection) are empty.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "../kernels/cpu/kernels.h"
#include "rnn_op.h"
#include "saved_memory.h"

namespace fastrnn {

#ifndef FASTRNN_WITH_CUDA
void cuda_forward_loop(const LoopTensors&) {
  TORCH_CHECK(false, "fastrnn: this build has no CUDA support");
}
void cuda_backward_loop(const LoopTensors&) {
  TORCH_CHECK(false, "fastrnn: this build has no CUDA support");
}
#endif

TORCH_LIBRARY(fastrnn, m) {
  const std::string forward_arguments =
      "(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool save, "
      "Tensor? resets=None, Tensor? zoneout_h=None, Tensor? zoneout_c=None, "
      "Tensor? rec_mask=None, bool bf16_gemms=False) ";
  m.def(("forward" + forward_arguments +
         "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor hprev, Tensor cprev, "
         "Tensor m)").c_str());
  // forward with its derivative in C++ (autograd.cpp), for eager calls that record
  // autograd: y, h_n and c_n (what it saves for the backward stays inside); one direction's
  // w_ih, w_hh, b_ih, b_hh, w_hr may also come without their leading [1] axis, and then one
  // step's x, h0, c0 without theirs (x [B, I]: T = 1; y, h_n, c_n come back so); grad_graph:
  // forward's first-order gradients as a differentiable graph, for double backward
  // (implemented in ops.py). need [8]: which of x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr
  // take a gradient; the others' entries are empty.
  m.def(("autograd_forward" + forward_arguments + "-> (Tensor y, Tensor h_n, Tensor c_n)")
            .c_str());
  m.def(
      "grad_graph(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, "
      "Tensor? resets, Tensor? zoneout_h, Tensor? zoneout_c, Tensor? rec_mask, Tensor? dy, "
      "Tensor? dh_n, Tensor? dc_n, int[] need) -> Tensor[]");
  m.def(
      "backward(str cell, Tensor? dy, Tensor? dh_n, Tensor? dc_n, Tensor x, Tensor w_ih, "
      "Tensor w_hh, Tensor? w_hr, Tensor? lengths, Tensor gates, Tensor hprev, Tensor cprev, "
      "Tensor m, bool reverse, bool input_grad, Tensor? resets=None, Tensor? zoneout_h=None, "
      "Tensor? zoneout_c=None, Tensor? rec_mask=None, bool bf16_gemms=False) "
      "-> (Tensor dx, Tensor dh0, Tensor dc0, "
      "Tensor dw_ih, Tensor dw_hh, Tensor db_ih, Tensor db_hh, Tensor dw_hr)");
  // LayerNorm LSTM/GRU (rnn_op.h: ln_forward_op): gx [T, B, D*G*H] holds the normalised
  // input projections, gx * gx_w + gx_b the input parts; the last output is ln_rstd
  // [D, T, B, 2] instead of m.
  m.def(
      "ln_forward(str cell, Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, "
      "Tensor ln_w, Tensor ln_b, Tensor? lnc_w, Tensor? lnc_b, Tensor gx_w, Tensor gx_b, "
      "Tensor? lengths, bool reverse, bool save, float eps, Tensor? resets=None, Tensor? zoneout_h=None, "
      "Tensor? zoneout_c=None, Tensor? rec_mask=None) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor hprev, Tensor cprev, "
      "Tensor ln_rstd)");
  m.def(
      "ln_backward(str cell, Tensor? dy, Tensor? dh_n, Tensor? dc_n, Tensor gx, Tensor gx_w, "
      "Tensor gx_b, Tensor w_hh, Tensor? b_hh, Tensor ln_w, Tensor ln_b, Tensor? lnc_w, "
      "Tensor? lnc_b, Tensor? lengths, Tensor gates, "
      "Tensor hprev, Tensor cprev, Tensor ln_rstd, bool reverse, Tensor? resets=None, "
      "Tensor? zoneout_h=None, Tensor? zoneout_c=None, Tensor? rec_mask=None) "
      "-> (Tensor dgx, Tensor dh0, Tensor dc0, Tensor dw_hh, Tensor db_hh, Tensor dln_w, "
      "Tensor dlnc_w, Tensor dlnc_b, Tensor dgx_w, Tensor dgx_b)");
  // a @ b with the GEMM the CPU kernels use (same bits for any thread count); for tests
  // and benchmarks.
  m.def("mm(Tensor a, Tensor b) -> Tensor");
}

// fastrnn::backward has no derivative of its own: second-order gradients come from ops.py,
// which rebuilds the first-order gradients as a differentiable graph when create_graph is
// set. A call that autograd would record fails here, rather than leave a graph that
// silently misses this op's part.
void backward_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                       torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    for (const c10::IValue& v : torch::jit::last(*stack, op.schema().arguments().size()))
      TORCH_CHECK(!(v.isTensor() && v.toTensor().requires_grad()),
                  "fastrnn: fastrnn::", op.schema().name().substr(9), " cannot be "
                  "differentiated. For second-order "
                  "gradients, differentiate fastrnn::forward (the fastrnn modules or "
                  "fastrnn.functional) with create_graph=True; call fastrnn::backward itself "
                  "under torch.no_grad() or on tensors that do not require grad");
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

TORCH_LIBRARY_IMPL(fastrnn, Autograd, m) {
  m.impl("backward", torch::CppFunction::makeFromBoxedFunction<&backward_autograd>());
  m.impl("ln_backward", torch::CppFunction::makeFromBoxedFunction<&backward_autograd>());
}

}  // namespace fastrnn

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrnn native ops (registered as torch.ops.fastrnn.*)";
#ifdef FASTRNN_WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif
  // The CPU kernels' instruction set: chosen from the CPU's feature flags at the first
  // call; tests and benchmarks may pick another one this CPU supports.
  m.def("cpu_kernels", [] { return std::string(fastrnn::cpu::kernels().name); },
        "Instruction set of the CPU kernels in use: avx512, avx2 or portable");
  m.def("supported_cpu_kernels", &fastrnn::cpu::supported_kernels,
        "Instruction sets this build has and this CPU runs, best first");
  m.def("cpu_features", &fastrnn::cpu::cpu_features,
        "The CPU's features the kernels care about (CPUID flags)");
  m.def("set_cpu_kernels", &fastrnn::cpu::set_kernels, pybind11::arg("name"),
        "Use the named CPU kernels from now on; False if this CPU cannot run them");
  m.def(
      "fma_peak",
      [](bool f64, int threads, double seconds) {
        const auto& k = fastrnn::cpu::kernels();
        return (f64 ? k.fma_peak_f64 : k.fma_peak_f32)(threads, seconds);
      },
      pybind11::arg("float64"), pybind11::arg("threads"), pybind11::arg("seconds") = 0.2,
      pybind11::call_guard<pybind11::gil_scoped_release>(),
      "GFLOP/s of independent vector FMAs in registers on `threads` threads with the CPU "
      "kernels in use: the multiply-add limit the machine reaches at its present clock");
  m.def("bf16_step_wide", [] { return fastrnn::cpu::kernels().bf16_step_wide(); },
        "Whether the CPU kernels in use run the bfloat16 recurrent step for every batch "
        "size (bf16 products outpace float32 FMAs here), not only for the narrow tiles");
  m.def("bf16_step_amx", [] { return fastrnn::cpu::kernels().bf16_step_amx(); },
        "Whether the CPU kernels in use run the bfloat16 recurrent products of batches past "
        "the narrow tiles on AMX tiles (AMX-BF16, granted by the OS, and allowed)");
  m.def("allow_amx", &fastrnn::cpu::allow_amx, pybind11::arg("on"),
        "Let the bfloat16 recurrent products use AMX tiles where the CPU has them (default) "
        "or not; returns the previous setting (testing and benchmarking)");
  m.def("release_saved_memory", &fastrnn::release_saved_memory,
        "Free the cached blocks of the tensors CPU training forwards save for backward");
  m.def("saved_memory_cached", &fastrnn::saved_memory_cached,
        "Bytes of freed saved-tensor blocks held for reuse");
  m.def("release_scratch", &fastrnn::release_scratch,
        "Free the calling thread's CPU scratch memory (a call's large temporaries)");
  m.def("scratch_bytes", &fastrnn::scratch_bytes,
        "Bytes of the calling thread's CPU scratch memory");
  m.def("cuda_persistent", &fastrnn::cuda_persistent,
        "Whether the CUDA forward and backward try the persistent kernels first");
  m.def("set_cuda_persistent", &fastrnn::set_cuda_persistent, pybind11::arg("on"),
        "Try the persistent CUDA kernels first (on) or not (off)");
  m.def("cuda_persistent_runs", &fastrnn::cuda_persistent_runs,
        "Forward and backward calls the persistent CUDA kernels have run in this process");
}
