// Plain argument structs shared by the CPU and CUDA recurrence drivers (torch-free).
// One struct describes one direction of one layer. Arrays are row-major and time-major.
// G = gates per unit (LSTM 4, GRU 3, RNN 1), S = values saved per unit (cells.h),
// P = size of h (proj_size if set, else H). gx/y/dy/dgx/dgh rows may be wider than one
// direction (ldgx, ldy): the directions of a bidirectional layer share them side by side.
#pragma once

#include <cstdint>

namespace fastrnn {

template <class Scalar>
struct ForwardParams {
  int64_t T = 0, B = 0, H = 0, P = 0;  // steps, batch, hidden, state size
  int64_t ldgx = 0, ldy = 0;   // row strides of gx (>= G*H) and y (>= P)
  const Scalar* gx = nullptr;       // [T, B, ldgx] x W_ih^T + b_ih, gate-major, first G*H used
  const Scalar* w_hh = nullptr;     // [G*H, P]
  const Scalar* b_hh = nullptr;     // [G*H] or nullptr
  const Scalar* w_hr = nullptr;     // [P, H] LSTM projection or nullptr (then P == H)
  const Scalar* h0 = nullptr;       // [B, P]
  const Scalar* c0 = nullptr;       // [B, H] LSTM only
  const int64_t* lengths = nullptr;  // [B] valid steps per row, or nullptr (all T)
  bool reverse = false;        // walk t = len-1 .. 0 (each row from its own last step)
  Scalar* y = nullptr;              // [T, B, ldy] outputs (first P), zero where t >= lengths[b]
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
  int64_t ldy = 0, ldg = 0;    // row strides of dy (>= P) and dgx/dgh (>= G*H)
  const Scalar* dy = nullptr;       // [T, B, ldy] or nullptr (no gradient flows into y)
  const Scalar* gates = nullptr;    // [T, B, S*H] saved by forward
  const Scalar* hprev = nullptr;    // [T, B, P]
  const Scalar* cprev = nullptr;    // [T, B, H] LSTM only
  Scalar* dgx = nullptr;            // [T, B, ldg] out: d(pre-activation), input parts; 0 when padded
  Scalar* dgh = nullptr;            // [T, B, ldg] out: recurrent parts; may alias dgx (not GRU)
  const Scalar* dh_n = nullptr;     // [B, P] gradient w.r.t. h_n, or nullptr (zero)
  const Scalar* dc_n = nullptr;     // [B, H] gradient w.r.t. c_n, or nullptr (LSTM)
  Scalar* dh0 = nullptr;            // [B, P] out: gradient w.r.t. h0
  Scalar* dc0 = nullptr;            // [B, H] out: gradient w.r.t. c0 (LSTM only)
  Scalar* dhtot = nullptr;          // [T, B, P] out: total dL/dh per step, for dW_hr (proj only)
};

}  // namespace fastrnn
