// Plain argument structs shared by the CPU and CUDA recurrence drivers (torch-free).
// All arrays are dense, row-major, time-major. G = gates per unit (LSTM 4, GRU 3, RNN 1),
// S = values saved per unit (cells.h), P = size of h (proj_size if set, else H).
#pragma once

#include <cstdint>

namespace fastrnn {

template <class Scalar>
struct ForwardParams {
  int64_t T = 0, B = 0, H = 0, P = 0;  // steps, batch, hidden, state size
  const Scalar* gx = nullptr;       // [T, B, G*H] x W_ih^T + b_ih, gate-major within a row
  const Scalar* w_hh = nullptr;     // [G*H, P]
  const Scalar* b_hh = nullptr;     // [G*H] or nullptr
  const Scalar* w_hr = nullptr;     // [P, H] LSTM projection or nullptr (then P == H)
  const Scalar* h0 = nullptr;       // [B, P]
  const Scalar* c0 = nullptr;       // [B, H] LSTM only
  const int64_t* lengths = nullptr;  // [B] valid steps per row, or nullptr (all T)
  bool reverse = false;        // walk t = len-1 .. 0 (each row from its own last step)
  Scalar* y = nullptr;              // [T, B, P] outputs, zero where t >= lengths[b]
  Scalar* h_n = nullptr;            // [B, P]
  Scalar* c_n = nullptr;            // [B, H] LSTM only
  // Saved for backward; all nullptr for inference.
  Scalar* gates = nullptr;          // [T, B, S*H] cell values, value k of unit j at k*H + j
  Scalar* hprev = nullptr;          // [T, B, P] state entering the step at time t
  Scalar* cprev = nullptr;          // [T, B, H] LSTM cell state entering time t
  Scalar* m = nullptr;              // [T, B, H] LSTM output before projection (proj only)
  bool saving() const { return gates != nullptr; }
};

template <class Scalar>
struct BackwardParams {
  int64_t T = 0, B = 0, H = 0, P = 0;  // steps, batch, hidden, state size
  const Scalar* w_hh = nullptr;     // [G*H, P]
  const Scalar* w_hr = nullptr;     // [P, H] or nullptr
  const int64_t* lengths = nullptr;  // [B] or nullptr
  bool reverse = false;
  const Scalar* dy = nullptr;       // [T, B, P] or nullptr (no gradient flows into y)
  const Scalar* gates = nullptr;    // [T, B, S*H] saved by forward
  const Scalar* hprev = nullptr;    // [T, B, P]
  const Scalar* cprev = nullptr;    // [T, B, H] LSTM only
  Scalar* dgx = nullptr;            // [T, B, G*H] out: d(pre-activation), input parts; 0 when padded
  Scalar* dgh = nullptr;            // [T, B, G*H] out: recurrent parts; may alias dgx (not GRU)
  Scalar* dh = nullptr;             // [B, P] in: dh_n (or zeros), out: dh0
  Scalar* dc = nullptr;             // [B, H] in: dc_n (or zeros), out: dc0 (LSTM only)
  Scalar* dhtot = nullptr;          // [T, B, P] out: total dL/dh per step, for dW_hr (proj only)
};

}  // namespace fastrnn
