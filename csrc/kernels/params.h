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
  // CPU bf16 GEMMs, in place of gx: x W_ih^T as its bfloat16 product came ([T, B, ldgx],
  // the bits), and b_ih ([G*H], or nullptr), added as the kernel reads it: the same values
  // as gx, without a pass that writes them out in float32 (float32 cells without LayerNorm).
  const uint16_t* gx16 = nullptr;
  const Scalar* gx16_bias = nullptr;
  const Scalar* w_hh = nullptr;     // [G*H, P]
  const Scalar* b_hh = nullptr;     // [G*H] or nullptr
  const Scalar* w_hr = nullptr;     // [P, H] LSTM projection or nullptr (then P == H)
  const Scalar* h0 = nullptr;       // [B, P]
  const Scalar* c0 = nullptr;       // [B, H] LSTM only
  const int64_t* lengths = nullptr;  // [B] valid steps per row, or nullptr (all T)
  bool reverse = false;        // walk t = len-1 .. 0 (each row from its own last step)
  const uint8_t* resets = nullptr;  // [T, B] bool episode starts, or nullptr (see reset_before)
  // Zoneout, or nullptr: the weight z of the previous value of each unit at each step, so
  // the state leaving step t is z * (state entering) + (1 - z) * (cell's new state), and
  // the output is that state (z is 0 or 1 in training, p in eval).
  const Scalar* zoneout_h = nullptr;  // [T, B, P]
  const Scalar* zoneout_c = nullptr;  // [T, B, H] LSTM only (set with zoneout_h)
  // Recurrent dropout, or nullptr: the h that feeds W_hh is h * rec_mask at every step (the
  // mask holds 0 or 1/(1-p)); the cell's own use of h (GRU's z * h) and the output are not
  // masked.
  const Scalar* rec_mask = nullptr;  // [B, P]
  // LayerNorm cells (cells.h: LnLstm, LnGru; no projection), else nullptr. gx holds the
  // input parts already normalised (and biased); the recurrent parts are
  // ln_w * norm(h W_hh^T) + ln_b (+ b_hh), norm over the row's G*H values; LnLstm's
  // output is o * tanh(lnc_w * norm(c) + lnc_b). norm(v) = (v - mean) / sqrt(var + eps).
  const Scalar* ln_w = nullptr;     // [G*H]
  const Scalar* ln_b = nullptr;     // [G*H]
  const Scalar* lnc_w = nullptr;    // [H] LnLstm only
  const Scalar* lnc_b = nullptr;    // [H] LnLstm only
  const Scalar* gx_w = nullptr;     // [G*H] LN_ih's affine: the input parts are
  const Scalar* gx_b = nullptr;     // [G*H]   gx * gx_w + gx_b (gx only normalised)
  double eps = 0;                   // LayerNorm's epsilon (a double for every Scalar)
  Scalar* ln_rstd = nullptr;        // [T, B, 2] saved: 1/sqrt(var + eps) of the recurrent
                                    // gate vector, and of c (LnLstm); 0 where padded
  bool layer_norm() const { return ln_w != nullptr; }
  Scalar* y = nullptr;              // [T, B, ldy] outputs (first P), zero where t >= lengths[b]
  Scalar* h_n = nullptr;            // [B, P]
  Scalar* c_n = nullptr;            // [B, H] LSTM only
  // Saved for backward; all nullptr for inference.
  Scalar* gates = nullptr;          // [T, B, S*H] cell values, value k of unit j at k*H + j
  Scalar* hprev = nullptr;          // [T, B, P] state entering the step at time t
  Scalar* cprev = nullptr;          // [T, B, H] LSTM cell state entering time t
  Scalar* m = nullptr;              // [T, B, H] LSTM output before projection (proj only)
  bool saving() const { return gates != nullptr; }
  // The recurrent product h W_hh^T with bfloat16 operands (W_hh and the h fed to it rounded
  // once), float32 sums, where the kernels have it (float32 on a CPU with AVX512_BF16,
  // cells without LayerNorm); the rest of the step stays in Scalar.
  bool bf16_step = false;
};

template <class Scalar>
struct BackwardParams {
  int64_t T = 0, B = 0, H = 0, P = 0;  // steps, batch, hidden, state size
  const Scalar* w_hh = nullptr;     // [G*H, P]
  const Scalar* w_hr = nullptr;     // [P, H] or nullptr
  const int64_t* lengths = nullptr;  // [B] or nullptr
  bool reverse = false;
  const uint8_t* resets = nullptr;  // [T, B] bool or nullptr, as in ForwardParams
  const Scalar* zoneout_h = nullptr;  // [T, B, P] or nullptr, as in ForwardParams
  const Scalar* zoneout_c = nullptr;  // [T, B, H] or nullptr (LSTM)
  const Scalar* rec_mask = nullptr;   // [B, P] or nullptr, as in ForwardParams
  // LayerNorm cells, as in ForwardParams (ln_w non-null); gates then holds the cell's saved
  // values and the norms (cells.h); dgx is w.r.t. the input parts after LN_ih's affine.
  const Scalar* ln_w = nullptr;     // [G*H]
  const Scalar* lnc_w = nullptr;    // [H] LnLstm
  const Scalar* lnc_b = nullptr;    // [H] LnLstm
  const Scalar* ln_rstd = nullptr;  // [T, B, 2] saved by forward
  // What the gates are recomputed from (ForwardParams' gx, ldgx, gx_w, gx_b, ln_b, b_hh).
  const Scalar* gx = nullptr;       // [T, B, ldgx]
  int64_t ldgx = 0;
  const Scalar* gx_w = nullptr;     // [G*H]
  const Scalar* gx_b = nullptr;     // [G*H]
  const Scalar* ln_b = nullptr;     // [G*H]
  const Scalar* b_hh = nullptr;     // [G*H] or nullptr
  Scalar* draw = nullptr;           // [T, B, ldg] out: d(h W_hh^T), the LayerNorm's input
                                    //   (feeds dW_hh); dgh is then w.r.t. its output
  Scalar* dlnc = nullptr;           // [T, B, H] out: d(lnc_w * norm(c) + lnc_b) (LnLstm)
  bool layer_norm() const { return ln_w != nullptr; }
  int64_t ldy = 0, ldg = 0;    // row strides of dy (>= P) and dgx/dgh (>= G*H)
  const Scalar* dy = nullptr;       // [T, B, ldy] or nullptr (no gradient flows into y)
  const Scalar* gates = nullptr;    // [T, B, S*H] saved by forward
  const Scalar* hprev = nullptr;    // [T, B, P]
  const Scalar* cprev = nullptr;    // [T, B, H] LSTM only
  Scalar* dgx = nullptr;            // [T, B, ldg] out: d(pre-activation), input parts; 0 when padded
  Scalar* dgh = nullptr;            // [T, B, ldg] out: recurrent parts; may alias dgx (not GRU)
  const Scalar* dh_n = nullptr;     // [B, P] gradient w.r.t. h_n, or nullptr (zero)
  const Scalar* dc_n = nullptr;     // [B, H] gradient w.r.t. c_n, or nullptr (LSTM)
  Scalar* dh0 = nullptr;            // [B, P] out: gradient w.r.t. h0 (also through resets)
  Scalar* dc0 = nullptr;            // [B, H] out: gradient w.r.t. c0 (LSTM only)
  Scalar* dhtot = nullptr;          // [T, B, P] out: total dL/dh per step, for dW_hr (proj only)
  // The recurrent product dgates W_hh with bfloat16 operands (W_hh and the gate gradients
  // fed to it rounded once), float32 sums, under ForwardParams::bf16_step's rules.
  bool bf16_step = false;
};

// Whether the state entering step t of row b is replaced by the initial state (h0, c0).
// resets[t, b] marks step t as the first of an episode. Forward in time that state is the
// one entering t; a reverse direction meets the episode's steps last to first, so it starts
// afresh at t when step t + 1 began an episode (t + 1 was processed just before t). Flags at
// padded steps (t >= lengths[b]) are ignored. resets: [T, B] bool as bytes; lengths: [B].
#if defined(__CUDACC__)
__host__ __device__
#endif
inline bool reset_before(const uint8_t* resets, const int64_t* lengths, int64_t T, int64_t B,
                         bool reverse, int64_t t, int64_t b) {
  const int64_t k = reverse ? t + 1 : t;  // the flag that decides
  const int64_t len = lengths ? lengths[b] : T;
  return resets && k < len && resets[k * B + b];
}

}  // namespace fastrnn
