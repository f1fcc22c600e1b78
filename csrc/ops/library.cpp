// The one schema block of the fastrnn ops, and the Python module entry point.
//
// forward runs one layer, all its directions (D = 1 or 2, stacked on a leading axis of
// every per-direction argument; shapes in python/fastrnn/ops.py); its last four outputs are
// what backward needs (empty when save=False). Cells: 'lstm', 'gru', 'rnn_tanh', 'rnn_relu'.
// Outputs a cell does not have (c_n for GRU/RNN, m without a projection) are empty.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "rnn_op.h"

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
  m.def(
      "forward(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool save) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor hprev, Tensor cprev, "
      "Tensor m)");
  m.def(
      "backward(str cell, Tensor? dy, Tensor? dh_n, Tensor? dc_n, Tensor x, Tensor w_ih, "
      "Tensor w_hh, Tensor? w_hr, Tensor? lengths, Tensor gates, Tensor hprev, Tensor cprev, "
      "Tensor m, bool reverse, bool input_grad) -> (Tensor dx, Tensor dh0, Tensor dc0, "
      "Tensor dw_ih, Tensor dw_hh, Tensor db_ih, Tensor db_hh, Tensor dw_hr)");
}

}  // namespace fastrnn

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrnn native ops (registered as torch.ops.fastrnn.*)";
#ifdef FASTRNN_WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif
}
