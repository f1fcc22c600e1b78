// CPU recurrence driver: runs the whole time loop of one layer (one or both directions),
// forward or backward, for any cell policy from cells.h, on the register-tiled kernels of
// gemm.h for one instruction set (Isa below). Torch-free.
//
// Parallel scheme: one OpenMP region lives for the whole sequence (see Plan below).
// Hidden split (weight-stationary): each thread of a direction's team owns a slice of
// hidden units across all gates and keeps its slice of W_hh packed in its own cache.
// Forward, one pass per tile: the accumulators of MR rows x (all G gates of L units) run
// the K loop and then the cell's gate math (cells.h on Vec lanes) before they leave the
// registers; h, c and the saved values are written once. A batch of one to three rows
// takes wider tiles (several unit blocks at once, Isa::narrow_blocks) so the few rows
// still give enough independent FMA chains. The team meets once per step at
// a spin barrier (twice with a projection). Row split: each thread runs its own share of
// the batch rows with the whole W_hh and no barrier.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "../cells.h"
#include "../params.h"
#include "gemm.h"
#include "kernels.h"
#ifdef FASTRNN_CPU_BF16
#include "amx.h"
#include "bf16_dot.h"
#endif
#include "layer_norm.h"
#include "simd.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {

// One instruction set's tiling: vectors of VecBytes bytes, AccRegs vector registers for
// accumulators, and the (GemmMR rows x GemmNV vectors) tile of the plain GEMMs.
template <int VecBytes, int AccRegs, int GemmMR, int GemmNV>
struct Isa {
  static constexpr int kAccRegs = AccRegs;
  template <class T> static constexpr int kLanes = VecBytes / static_cast<int>(sizeof(T));
  template <class T> using V = Vec<T, kLanes<T>>;
  template <class T> using Gemm = cpu::Gemm<T, kLanes<T>, GemmMR, GemmNV>;
  // Rows of the fused forward tile of a cell with G gates: G * MR accumulators.
  static constexpr int rows_for(int G) { return std::max(1, std::min(8, AccRegs / G)); }
  // Small batches: with one or two rows, G accumulators are too few independent FMA chains
  // to hide the FMA latency, so the tile also spans NB unit blocks (the fewest, a power
  // of two, giving at least 8 chains per row) and as many rows as the registers allow.
  static constexpr int narrow_blocks(int G) {
    int nb = 1;
    while (nb * G < 8) nb *= 2;
    return nb;
  }
  static constexpr int narrow_rows(int G) {
    return std::max(1, std::min(8, AccRegs / (narrow_blocks(G) * G)));
  }
};

class SpinBarrier {
 public:
  void reset(int n) {
    n_ = n;
    count_.store(0, std::memory_order_relaxed);
  }
  void wait() {
    if (n_ <= 1) return;
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    // Spin briefly (steps are microseconds apart), then yield so an oversubscribed
    // machine still makes progress.
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins > 2000) std::this_thread::yield();
    }
  }

 private:
  int n_ = 1;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

struct Team {
  int rank = 0, size = 1;
  SpinBarrier* barrier = nullptr;
  void sync() const { barrier->wait(); }
};

struct Range {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};

// Split n units into `parts` contiguous ranges in blocks of 16 (one cache line of floats),
// so threads rarely share a line of the state they write.
inline Range split(int64_t n, int parts, int k) {
  const int64_t blocks = (n + 15) / 16;
  return {std::min(n, blocks * k / parts * 16), std::min(n, blocks * (k + 1) / parts * 16)};
}


inline int64_t time_of(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// Whether the bf16 products of a batch of B rows run on AMX tiles (amx.h): past the narrow
// tiles, where a step is bound by multiply-adds, for a float32 W_hh of 64 KiB or more
// (below, the step is bound by the gate math: measured with LSTM and RNN at B=16, a W_hh
// of 16-64 KiB gained 0-10%, 256 KiB 23%), where the CPU and OS have the tiles.
template <class Cell, class Isa>
bool amx_products(int64_t B, int64_t H, int64_t P) {
#ifdef FASTRNN_CPU_BF16
  return B > Isa::narrow_rows(Cell::kGates) && Cell::kGates * H * P * 4 >= (64 << 10) &&
         amx_usable();
#else
  (void)B, (void)H, (void)P;
  return false;
#endif
}

// Whether a layer's recurrent products (forward h W_hh^T, backward dgates W_hh) take bf16
// operands, when asked for (bf16_step; float32 cells without LayerNorm):
// - a batch within the narrow tiles (B <= narrow_rows), whose step streams W_hh: on a CPU
//   with AVX512_BF16, for a float32 W_hh of 512 KiB or more (a smaller one streams from
//   the caches fast enough that the rounding costs more than it saves; measured: RNN at
//   H=256, 256 KiB, 10% slower);
// - a larger batch, whose step is bound by multiply-adds: on AMX tiles (amx_products),
//   else with AVX512_BF16 for a W_hh of 512 KiB or more where bf16 products outpace
//   float32 FMAs (bf16_step_wide).
// Every rule holds for any thread count.
template <class Cell, class Isa, class T>
bool bf16_products(bool asked, int64_t B, int64_t H, int64_t P) {
#ifdef FASTRNN_CPU_BF16
  constexpr int G = Cell::kGates;
  if (!std::is_same_v<T, float> || Cell::kLayerNorm || !asked) return false;
  const bool large = G * H * P * 4 >= (512 << 10);
  if (B <= Isa::narrow_rows(G)) return large && has_bf16_dot();
  return amx_products<Cell, Isa>(B, H, P) || (large && has_bf16_dot() && bf16_step_wide());
#else
  (void)asked, (void)B, (void)H, (void)P;
  return false;
#endif
}

// Whether a call's recurrent products read W_hh where it lies (row_dots forward, up to
// kRowDotRows rows; unpacked_rows backward, up to kInPlaceRows) instead of packing it: one
// step of a few rows (a cell call, a decoder's step), where packing would cost more than
// the step. From T and B alone.
inline bool weights_in_place(int64_t T, int64_t B, int64_t max_rows) {
  return T == 1 && B <= max_rows;
}

// W_hh rows of units [j0, j0 + hs), packed for the fused tile in blocks of NB * L units:
// block u (units j0 + u*NB*L ...) is a panel [P][NB][G][L] holding W_hh[g*H + j][k] at
// (k, b, g, l) for unit j = j0 + (u*NB + b)*L + l, zero past hs.
// w_hh: [G*H, P]; out: [ceil(hs / (NB*L))][P][NB][G][L].
template <int G, int NB, class V, class T>
void pack_gates(const T* w_hh, int64_t H, int64_t P, int64_t j0, int64_t hs, T* out) {
  constexpr int L = V::kLanes, W = NB * G * L;  // values per k in a panel
  for (int64_t u = 0; u * NB * L < hs; ++u)
    for (int b = 0; b < NB; ++b)
      for (int g = 0; g < G; ++g) {
        const int64_t j = (u * NB + b) * L;  // first unit of this L-wide column block
        transpose_pack<V>(w_hh + (g * H + j0 + j) * P, P, std::clamp<int64_t>(hs - j, 0, L), P,
                          out + u * P * W + (b * G + g) * L, W);
      }
}

// What the fused tiles of one step read and write. Rows are in schedule order: row i is
// batch row order[i]; the running state buffers hold them in that order.
template <class T>
struct StepIo {
  const T* hin;    // [Bn, P] h entering the step
  const T* hrec;   // [Bn, P] the h that feeds W_hh: hin, or hin * rec_mask
  const T* cin;    // [Bn, H] c entering the step (LSTM)
  T* hout;         // [Bn, P] h leaving the step (no projection)
  T* cout;         // [Bn, H] c leaving the step (LSTM)
  T* mbuf;         // [Bn, H] cell output before the projection (projection only)
  T* yt;           // [B, ldy] this step's output rows, caller's row order
  int64_t row0;    // t * B: flat row of batch row 0 at this step in gx, gates, m
  int64_t next0;   // the same for the next step, or -1 after the last
  const int64_t* order;  // [Bn] batch row of schedule row i
  const T* bias;   // [G*H] b_hh (or zeros)
  bool save, proj;
};

// The input part of gate values [q, q + n) (n <= L) of flat row `row`: gx, or the bfloat16
// product gx16 widened plus gx16_bias.
template <class V, class T>
FASTRNN_INLINE V input_part(const ForwardParams<T>& p, int64_t row, int64_t q, int n) {
  constexpr int L = V::kLanes;
  if constexpr (std::is_same_v<T, float>) {
    if (p.gx16) {
      const V v = load_bf16<L>(p.gx16 + row * p.ldgx + q, n);
      if (!p.gx16_bias) return v;
      return v + (n == L ? V::load(p.gx16_bias + q) : V::load(p.gx16_bias + q, n));
    }
  }
  const T* x = p.gx + row * p.ldgx + q;
  return n == L ? V::load(x) : V::load(x, n);
}

// One fused tile: rows [i0, i0 + MR) x all G gates of units [u0, u0 + nu) (nu <= NB*L).
// product(acc) accumulates h W_hh^T of those rows and units in registers (from one panel of
// pack_gates, or of pack_gates_bf16); the gate math then runs on the accumulators and
// writes h (to y, or to mbuf for the projection), c and the saved values.
template <class Cell, int MR, int NB, class V, class T, class Product>
FASTRNN_INLINE void fused_tile(const ForwardParams<T>& p, const StepIo<T>& io, int64_t i0,
                               int64_t u0, int64_t nu, Product&& product) {
  constexpr int G = Cell::kGates, S = Cell::kSaved, L = V::kLanes;
  const int64_t H = p.H, P = p.P;
  V acc[MR][NB * G];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NB * G; ++v) acc[r][v] = V(T(0));
  product(acc);

#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) {
    const int64_t ub = u0 + b * L;  // first unit of this column block
    const int n = static_cast<int>(std::min<int64_t>(L, u0 + nu - ub));
    if (n <= 0) break;
    const bool full = n == L;
    auto load = [full, n](const T* q) { return full ? V::load(q) : V::load(q, n); };
    auto store = [full, n](V v, T* q) { full ? v.store(q) : v.store(q, n); };
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int64_t i = i0 + r, bi = io.order[i], row = io.row0 + bi;
      V xg[G], hg[G], sv[S], h, c(T(0));
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        xg[g] = input_part<V>(p, row, g * H + ub, n);
        hg[g] = acc[r][b * G + g] + load(io.bias + g * H + ub);
      }
      if (io.next0 >= 0) {  // the same units of the next step's input projection, from memory
        const int64_t q = (io.next0 + bi) * p.ldgx + ub;
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
          if (p.gx16)
            __builtin_prefetch(p.gx16 + q + g * H);
          else
            __builtin_prefetch(p.gx + q + g * H);
        }
      }
      const V hp = Cell::kUsesPrevH ? load(io.hin + i * P + ub) : V(T(0));
      const V cp = Cell::kHasCell ? load(io.cin + i * H + ub) : V(T(0));
      Cell::forward(xg, hg, hp, cp, h, c, sv);
      if (io.proj) {
        store(h, io.mbuf + i * H + ub);
        if (io.save) store(h, p.m + row * H + ub);
      } else {
        store(h, io.hout + i * P + ub);
        store(h, io.yt + bi * p.ldy + ub);
      }
      if constexpr (Cell::kHasCell) store(c, io.cout + i * H + ub);
      if (io.save) {
#pragma GCC unroll 4
        for (int k = 0; k < S; ++k) store(sv[k], p.gates + row * S * H + k * H + ub);
      }
    }
  }
}

// LayerNorm cells: fused_tile's product without the gate math, which needs the whole row's
// statistics first. The accumulators, h W_hh^T of rows [i0, i0 + MR) x all G gates of units
// [u0, u0 + nu), go to raw [Bn, G*H] (schedule order, gate g of unit j at g*H + j).
template <int G, int MR, int NB, class V, class T>
FASTRNN_INLINE void raw_tile(int64_t P, int64_t H, const T* hrec, const T* panel, int64_t i0,
                             int64_t u0, int64_t nu, T* raw) {
  constexpr int L = V::kLanes;
  V acc[MR][NB * G];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NB * G; ++v) acc[r][v] = V(T(0));
  tile_acc<MR, NB * G>(P, hrec + i0 * P, P, 1, panel, acc);
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) {
    const int64_t ub = u0 + b * L;
    const int n = static_cast<int>(std::min<int64_t>(L, u0 + nu - ub));
    if (n <= 0) break;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        T* q = raw + (i0 + r) * G * H + g * H + ub;
        if (n == L)
          acc[r][b * G + g].store(q);
        else
          acc[r][b * G + g].store(q, n);
      }
  }
}

// Gradient math for units [0, n) of one batch row. Value k of unit u at save[k*xs + u],
// dgx[k*xs + u], dgh[k*xs + u]. dout may alias dhp (read before written, same unit).
template <class Cell, bool Direct, class T>
inline void backward_units(int64_t n, const T* save, int64_t xs, const T* hp, const T* cp,
                           const T* dout, T* dc, T* dgx, T* dgh, T* dhp) {
  constexpr int G = Cell::kGates, S = Cell::kSaved;
#pragma GCC ivdep
  for (int64_t u = 0; u < n; ++u) {
    T sv[S], gx[G], gh[G], d;
#pragma GCC unroll 4
    for (int k = 0; k < S; ++k) sv[k] = save[k * xs + u];
    T dcv = Cell::kHasCell ? dc[u] : T(0);
    Cell::backward(sv, Cell::kUsesPrevH ? hp[u] : T(0), Cell::kHasCell ? cp[u] : T(0), dout[u],
                   dcv, gx, gh, d);
#pragma GCC unroll 4
    for (int k = 0; k < G; ++k) dgx[k * xs + u] = gx[k];
    if constexpr (Cell::kSplitGrad) {
#pragma GCC unroll 4
      for (int k = 0; k < G; ++k) dgh[k * xs + u] = gh[k];
    }
    if constexpr (Cell::kHasCell) dc[u] = dcv;
    if constexpr (Direct) dhp[u] = d;
  }
}

// Rows in the order the loop visits them: longest sequence first, so the rows still
// running at any step are a prefix and finished ones cost no GEMM or gate work.
struct Schedule {
  int64_t rows = 0;                 // rows this schedule covers (all B, or a thread's share)
  const int64_t* order = nullptr;   // [rows] batch row of the i-th longest sequence
  const int64_t* active = nullptr;  // [T] rows with t < lengths at time t (a prefix of order)
};

inline void make_schedule(const int64_t* lengths, int64_t T, int64_t B, int64_t* order,
                          int64_t* active) {
  for (int64_t b = 0; b < B; ++b) order[b] = b;
  if (!lengths) {
    std::fill(active, active + T, B);
    return;
  }
  std::stable_sort(order, order + B, [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  int64_t n = B;
  for (int64_t t = 0; t < T; ++t) {
    while (n > 0 && lengths[order[n - 1]] <= t) --n;
    active[t] = n;
  }
}

template <class Cell, class Isa, class T>
void forward_team(const ForwardParams<T>& p, const Schedule& sched, T* ws, const Team& team) {
  using V = typename Isa::template V<T>;
  using Gemm = typename Isa::template Gemm<T>;
  constexpr int G = Cell::kGates, L = V::kLanes, MR = Isa::rows_for(G);
  const int64_t Tn = p.T, B = p.B, H = p.H, P = p.P;
  const bool proj = p.w_hr != nullptr, saving = p.saving();
  const Range hr = split(H, team.size, team.rank);
  const Range pr = proj ? split(P, team.size, team.rank) : hr;
  const int64_t j0 = hr.begin, j1 = hr.end, hs = hr.size();
  const int64_t p0 = pr.begin, p1 = pr.end, ps = pr.size();
  const int64_t* order = sched.order;
  const int64_t Bn = sched.rows;  // rows handled here; B stays the row stride of the tensors

  // Workspace. The running state is kept in schedule order (row i = order[i]).
  T* hbuf = ws;                 // [2, B, P] ping-pong h, schedule order
  T* cbuf = hbuf + 2 * Bn * P;  // [2, B, H] ping-pong c, schedule order
  T* mbuf = cbuf + 2 * Bn * H;  // [B, H] output before projection, schedule order
  T* zeros = mbuf + Bn * H;     // [G*H] stands in for a missing b_hh
  T* hdrop = zeros + G * H;     // [2, B, P] ping-pong h * rec_mask, schedule order
  if (!p.b_hh)  // each thread reads only its own units of every gate
    for (int k = 0; k < G; ++k) std::fill(zeros + k * H + j0, zeros + k * H + j1, T(0));

  // This thread's slice of W_hh, packed once for the whole sequence, and of W_hr^T
  // (op(B)[k, n] = W_hr[p0 + n, k], K = H, N = ps). A batch of at most narrow_rows rows
  // (all of B: the choice must not depend on the thread split) takes the narrow tiles.
  constexpr int NBn = Isa::narrow_blocks(G), MRn = Isa::narrow_rows(G);
  const bool narrow = B <= MRn;
  const int64_t width = (narrow ? NBn : 1) * L;  // units per panel
  const int64_t blocks = (hs + width - 1) / width;
  // weights_in_place: the product reads W_hh as it lies instead (row_dots into raw).
  const bool direct = weights_in_place(Tn, B, kRowDotRows);
  // bf16 step (bf16_products): W_hh as bf16 pairs instead, and the h that feeds it rounded
  // once per step into hb (pairs, ping-pong [2, Bn, K2], schedule order, in the team's
  // workspace where LayerNorm cells keep raw) by the thread that wrote it; past the narrow
  // tiles on AMX where there is one (amx).
  const bool bf16 = !direct && bf16_products<Cell, Isa, T>(p.bf16_step, B, H, P);
  [[maybe_unused]] const bool amx = bf16 && amx_products<Cell, Isa>(B, H, P);
  const int64_t K2 = bf16_pairs(P);
  Buffer<T> w_rec;
  Buffer<int32_t> w16;
  [[maybe_unused]] int32_t* hb = reinterpret_cast<int32_t*>(hdrop + 2 * Bn * P);  // [2, Bn, K2]
  if (bf16) {
#ifdef FASTRNN_CPU_BF16
    using VI = Vec<int32_t, L>;
    w16.resize(std::max<int64_t>(1, blocks * K2 * G * width));
    if constexpr (std::is_same_v<T, float>) {
      if (narrow)
        pack_gates_bf16<G, NBn, VI>(p.w_hh, H, P, j0, hs, w16.data);
      else
        pack_gates_bf16<G, 1, VI>(p.w_hh, H, P, j0, hs, w16.data);
      static_assert(L == 16, "AMX: a panel of 16 units is one C tile per gate");
      if (amx) amx_begin();
    }
#endif
  } else if (!direct) {
    w_rec.resize(std::max<int64_t>(1, blocks * P * G * width));
    if (narrow)
      pack_gates<G, NBn, V>(p.w_hh, H, P, j0, hs, w_rec.data);
    else
      pack_gates<G, 1, V>(p.w_hh, H, P, j0, hs, w_rec.data);
  }
  // This thread's columns of the h that feeds the next step's W_hh, as bf16 pairs, into
  // slot k of hb; the thread with the last columns also writes the zero padding.
  auto round_h = [&](const T* h, int64_t k) {
#ifdef FASTRNN_CPU_BF16
    if constexpr (std::is_same_v<T, float>)
      for (int64_t i = 0; i < Bn; ++i)
        to_bf16_pairs(h + i * P, p0, p0 < p1 && p1 == P ? 2 * K2 : p1, P, hb + (k * Bn + i) * K2);
#endif
    (void)h, (void)k;
  };
  Buffer<T> w_proj_mem;
  Panels<T> w_proj{nullptr, H, proj ? ps : 0, Gemm::kWidth};
  if (w_proj.N > 0) {
    w_proj_mem.resize(w_proj.count() * H * Gemm::kWidth);
    pack_panels<V>(p.w_hr + p0 * H, 1, H, H, ps, Gemm::kWidth, 0, w_proj.count(), w_proj_mem.data);
    w_proj.data = w_proj_mem.data;
  }

  // Recurrent dropout: out = h * rec_mask for every row of an h buffer in schedule order
  // (this thread's columns), the copy of h the next step's recurrent GEMM reads.
  auto drop = [&](const T* h, T* out) {
    for (int64_t i = 0; i < Bn; ++i) {
      const T* mask = p.rec_mask + order[i] * P;
      for (int64_t q = p0; q < p1; ++q) out[i * P + q] = h[i * P + q] * mask[q];
    }
  };

  // Initial state into schedule order; each thread copies the columns it will update.
  for (int64_t i = 0; i < Bn; ++i) {
    std::copy(p.h0 + order[i] * P + p0, p.h0 + order[i] * P + p1, hbuf + i * P + p0);
    if (Cell::kHasCell) std::copy(p.c0 + order[i] * H + j0, p.c0 + order[i] * H + j1, cbuf + i * H + j0);
  }
  if (p.rec_mask) drop(hbuf, hdrop);
  if (bf16) round_h(p.rec_mask ? hdrop : hbuf, 0);
  team.sync();  // the first step reads every column of h

  // Zoneout of step s at time t for the running rows (this thread's columns): each unit
  // of the state mixes its previous and its new value, and the output is the state.
  auto zoneout = [&](const StepIo<T>& io, int64_t t, int64_t n) {
    if (!p.zoneout_h) return;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = order[i], row = t * B + b;
      const T* z = p.zoneout_h + row * P;
      const T* hp = io.hin + i * P;
      T* h = io.hout + i * P;
      T* y = io.yt + b * p.ldy;
      for (int64_t q = p0; q < p1; ++q) y[q] = h[q] = z[q] * hp[q] + (T(1) - z[q]) * h[q];
      if (Cell::kHasCell) {
        const T* zc = p.zoneout_c + row * H;
        const T* cp = io.cin + i * H;
        T* c = io.cout + i * H;
        for (int64_t j = j0; j < j1; ++j) c[j] = zc[j] * cp[j] + (T(1) - zc[j]) * c[j];
      }
    }
  };

  // Rows whose next step starts afresh (reset_before) take the initial state, written at
  // the end of step s into the buffers the next step reads; each thread writes its own
  // columns before the step's last barrier, so resets cost no barrier of their own.
  auto reset_next = [&](const StepIo<T>& io, int64_t s) {
    if (!p.resets || s + 1 >= Tn) return;
    const int64_t tn = time_of(s + 1, Tn, p.reverse);
    for (int64_t i = 0; i < Bn; ++i) {
      const int64_t b = order[i];
      if (!reset_before(p.resets, p.lengths, Tn, B, p.reverse, tn, b)) continue;
      std::copy(p.h0 + b * P + p0, p.h0 + b * P + p1, io.hout + i * P + p0);
      if (Cell::kHasCell) std::copy(p.c0 + b * H + j0, p.c0 + b * H + j1, io.cout + i * H + j0);
    }
  };

  // The running rows [0, n) (a prefix) in tiles: tile(rows, blocks, i0, u, u0, nu) (rows,
  // blocks: std::integral_constant) for every tile, u the unit block (panel) and [u0, u0 +
  // nu) its units. As in Gemm::run, the unit blocks go in groups whose panels stay in L2
  // together (about 512 KiB), and within a group each row tile runs over all its panels,
  // so the tile's rows of h stay in L1.
  const int64_t panel_bytes = (bf16 ? 2 * K2 * 2 : P * static_cast<int64_t>(sizeof(T))) * G * width;
  const int64_t group = std::max<int64_t>(1, (512 * 1024) / std::max<int64_t>(1, panel_bytes));
  auto for_tiles = [&](int64_t n, auto&& tile) {
    using One = std::integral_constant<int, 1>;
    auto units = [&](int64_t u) { return std::min(width, j1 - j0 - u * width); };
    if (narrow) {
      for (int64_t u = 0; u < blocks; ++u)
        with_rows<MRn>(n, [&](auto rows) {
          tile(rows, std::integral_constant<int, NBn>{}, int64_t(0), u, j0 + u * width, units(u));
        });
      return;
    }
    // Row tiles as even as possible (8 rows: 4 + 4, not 6 + 2): a tile of one or two rows
    // does too few FMAs per weight vector it loads to keep the FMA units busy.
    const int64_t tiles = (n + MR - 1) / MR;
    for (int64_t g0 = 0; g0 < blocks; g0 += group) {
      const int64_t g1 = std::min(blocks, g0 + group);
      for (int64_t k = 0; k < tiles; ++k) {
        const int64_t i0 = n * k / tiles, rows = n * (k + 1) / tiles - i0;
        for (int64_t u = g0; u < g1; ++u)
          with_rows<MR>(rows, [&](auto r) { tile(r, One{}, i0, u, j0 + u * width, units(u)); });
      }
    }
  };

  // LayerNorm cells' step for the running rows [0, n): h W_hh^T of this thread's units and
  // its blocks' moments; (barrier) every row's statistics, the normalised recurrent parts
  // and the cell math; LnLstm then also normalises c: its blocks' moments, (barrier) its
  // statistics and the output. Generic in the cell, so only LayerNorm cells instantiate it.
  const int64_t nblk = norm_blocks(H), k0 = first_block(j0), k1 = end_block(j1);
  T* raw = hdrop + 2 * Bn * P;         // [B, G*H] h W_hh^T, schedule order (LayerNorm, direct)
  T* part = raw + Bn * G * H;          // [B, nblk, 2] its blocks' moments
  T* part_c = part + 2 * Bn * nblk;    // [B, nblk, 2] those of c (LnLstm)
  // direct: h W_hh^T of the running rows [0, n) and this thread's units of every gate, from
  // W_hh as it lies, into raw.
  auto direct_product = [&](const StepIo<T>& io, int64_t n) {
    for (int g = 0; g < G; ++g)
      row_dots<V, T>(n, hs, P, io.hrec, P, p.w_hh + (g * H + j0) * P, P, false, nullptr,
                     raw + g * H + j0, G * H);
  };
  auto ln_cells = [&](auto cell, const StepIo<T>& io, int64_t t, int64_t n) {
    using C = decltype(cell);
    const int64_t GH = G * H;
    if (direct)
      direct_product(io, n);
    else
      for_tiles(n, [&](auto rows, auto nb, int64_t i0, int64_t u, int64_t u0, int64_t nu) {
        raw_tile<G, decltype(rows)::value, decltype(nb)::value, V>(
            P, H, io.hrec, w_rec.data + u * P * G * width, i0, u0, nu, raw);
      });
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = k0; k < k1; ++k)
        block_moments<V>(raw + i * GH, H, G, k, part + (i * nblk + k) * 2);
    team.sync();  // every block's moments are in
    for (int64_t i = 0; i < n; ++i) {
      const int64_t bi = order[i], row = t * B + bi;
      T mean, rstd;
      row_moments(part + i * nblk * 2, H, G, static_cast<T>(p.eps), mean, rstd);
      if (saving && team.rank == 0) p.ln_rstd[row * 2] = rstd;
      const T* x = p.gx + row * p.ldgx;
      T* save = saving ? p.gates + row * C::kSaved * H : nullptr;
      for_vectors<V, T>(j0, j1, [&](int64_t ub, auto load, auto store) {
        V xg[G], hg[G], norm[G], sv[C::kCellSaved], h, c(T(0));
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
          norm[g] = (load(raw + i * GH + g * H + ub) - V(mean)) * V(rstd);
          hg[g] = norm[g] * load(p.ln_w + g * H + ub) + load(p.ln_b + g * H + ub) +
                  load(io.bias + g * H + ub);
          xg[g] = load(x + g * H + ub) * load(p.gx_w + g * H + ub) + load(p.gx_b + g * H + ub);
        }
        if constexpr (C::kHasCell) {  // c now; h once c's statistics are known
          C::state(xg, hg, load(io.cin + i * H + ub), c, sv);
          store(c, io.cout + i * H + ub);
          store(sv[3], io.mbuf + i * H + ub);  // o
        } else {
          C::forward(xg, hg, load(io.hin + i * P + ub), V(T(0)), h, c, sv);
          store(h, io.hout + i * P + ub);
          store(h, io.yt + bi * p.ldy + ub);
        }
        if (saving) {
#pragma GCC unroll 4
          for (int g = 0; g < G; ++g) store(norm[g], save + g * H + ub);
        }
      });
    }
    if constexpr (C::kHasCell) {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = k0; k < k1; ++k)
          block_moments<V>(io.cout + i * H, H, 1, k, part_c + (i * nblk + k) * 2);
      team.sync();  // every block's moments of c are in
      for (int64_t i = 0; i < n; ++i) {
        const int64_t bi = order[i], row = t * B + bi;
        T mean, rstd;
        row_moments(part_c + i * nblk * 2, H, 1, static_cast<T>(p.eps), mean, rstd);
        if (saving && team.rank == 0) p.ln_rstd[row * 2 + 1] = rstd;
        T* save = saving ? p.gates + row * C::kSaved * H : nullptr;
        for_vectors<V, T>(j0, j1, [&](int64_t ub, auto load, auto store) {
          const V cn = (load(io.cout + i * H + ub) - V(mean)) * V(rstd);
          const V h = C::output(load(io.mbuf + i * H + ub), cn, load(p.lnc_w + ub),
                                load(p.lnc_b + ub));
          store(h, io.hout + i * P + ub);
          store(h, io.yt + bi * p.ldy + ub);
          if (saving) store(cn, save + C::kNormC * H + ub);
        });
      }
    }
  };

  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = time_of(s, Tn, p.reverse), n = sched.active[t];
    const StepIo<T> io{hbuf + (s % 2) * Bn * P,
                       (p.rec_mask ? hdrop : hbuf) + (s % 2) * Bn * P, cbuf + (s % 2) * Bn * H,
                       hbuf + ((s + 1) % 2) * Bn * P, cbuf + ((s + 1) % 2) * Bn * H, mbuf,
                       p.y + t * B * p.ldy, t * B,
                       s + 1 < Tn ? time_of(s + 1, Tn, p.reverse) * B : -1, order,
                       p.b_hh ? p.b_hh : zeros, saving, proj};

    // The other threads wrote most of the h the product reads (hrec, or its pairs in hb):
    // when it fits in L1 (small batches, where a step is short), ask for all its lines at
    // once, so the transfers between cores overlap instead of stalling the first tile one
    // line at a time.
    {
      const char* rows = bf16 ? reinterpret_cast<const char*>(hb + (s % 2) * Bn * K2)
                              : reinterpret_cast<const char*>(io.hrec);
      const int64_t bytes = n * (bf16 ? K2 * 4 : P * static_cast<int64_t>(sizeof(T)));
      if (team.size > 1 && bytes <= 16384)
        for (int64_t q = 0; q < bytes; q += 64) __builtin_prefetch(rows + q);
    }

    if constexpr (Cell::kLayerNorm) {
      ln_cells(Cell{}, io, t, n);
    } else {
      // The two products in separate instantiations of the tile: the bf16 one passes the
      // accumulators out of line, which would otherwise keep the float32 ones in memory.
      bool done = false;
#ifdef FASTRNN_CPU_BF16
      if constexpr (std::is_same_v<T, float>) {
        if (amx) {  // per block of 16 units (one panel) and 16 rows: sums, then the gate math
          alignas(64) float sums[16 * G * 16];  // [16 rows][G gates][16 units]
          const int32_t* h16 = hb + (s % 2) * Bn * K2;
          for (int64_t u = 0; u < blocks; ++u) {
            const int64_t u0 = j0 + u * width, nu = std::min(width, j1 - u0);
            for (int64_t i0 = 0; i0 < n; i0 += 16) {
              amx_panel<G>(K2, h16 + i0 * K2, K2, w16.data + u * K2 * G * width, G * width, sums);
              const int64_t rows = std::min<int64_t>(16, n - i0);
              for (int64_t r0 = 0; r0 < rows; r0 += 4)
                with_rows<4>(std::min<int64_t>(4, rows - r0), [&](auto r) {
                  constexpr int R = decltype(r)::value;
                  fused_tile<Cell, R, 1, V>(p, io, i0 + r0, u0, nu, [&](V (&acc)[R][G]) {
                    for (int k = 0; k < R; ++k)
                      for (int g = 0; g < G; ++g)
                        acc[k][g] = V::load(sums + ((r0 + k) * G + g) * 16);
                  });
                });
            }
          }
          done = true;
        } else if (bf16) {
          for_tiles(n, [&](auto rows, auto nb, int64_t i0, int64_t u, int64_t u0, int64_t nu) {
            constexpr int R = decltype(rows)::value, NV = decltype(nb)::value * G;
            fused_tile<Cell, R, decltype(nb)::value, V>(p, io, i0, u0, nu, [&](V (&acc)[R][NV]) {
              tile_acc_bf16<R, NV>((P + 1) / 2, hb + ((s % 2) * Bn + i0) * K2, K2,
                                   w16.data + u * K2 * G * width, acc);
            });
          });
          done = true;
        }
      }
#endif
      if (direct) {
        direct_product(io, n);
        for_tiles(n, [&](auto rows, auto nb, int64_t i0, int64_t u, int64_t u0, int64_t nu) {
          constexpr int R = decltype(rows)::value, NB = decltype(nb)::value;
          fused_tile<Cell, R, NB, V>(p, io, i0, u0, nu, [&](V (&acc)[R][NB * G]) {
            for (int b = 0; b < NB; ++b) {
              const int64_t ub = u0 + b * L, m = std::min<int64_t>(L, u0 + nu - ub);
              if (m <= 0) break;
              for (int r = 0; r < R; ++r)
                for (int g = 0; g < G; ++g) {
                  const T* q = raw + (i0 + r) * G * H + g * H + ub;
                  acc[r][b * G + g] = m == L ? V::load(q) : V::load(q, static_cast<int>(m));
                }
            }
          });
        });
        done = true;
      }
      if (!done)
        for_tiles(n, [&](auto rows, auto nb, int64_t i0, int64_t u, int64_t u0, int64_t nu) {
          constexpr int R = decltype(rows)::value, NV = decltype(nb)::value * G;
          fused_tile<Cell, R, decltype(nb)::value, V>(p, io, i0, u0, nu, [&](V (&acc)[R][NV]) {
            tile_acc<R, NV>(P, io.hrec + i0 * P, P, 1, w_rec.data + u * P * G * width, acc);
          });
        });
    }

    for (int64_t i = 0; i < Bn; ++i) {
      const int64_t row = t * B + order[i];
      if (saving) {  // what backward reads: the state entering this step
        std::copy(io.hin + i * P + p0, io.hin + i * P + p1, p.hprev + row * P + p0);
        if (Cell::kHasCell)
          std::copy(io.cin + i * H + j0, io.cin + i * H + j1, p.cprev + row * H + j0);
      }
      if (i < n) continue;
      // Finished or not yet started: state passes through, output is zero.
      if (Cell::kHasCell) std::copy(io.cin + i * H + j0, io.cin + i * H + j1, io.cout + i * H + j0);
      std::copy(io.hin + i * P + p0, io.hin + i * P + p1, io.hout + i * P + p0);
      std::fill(io.yt + order[i] * p.ldy + p0, io.yt + order[i] * p.ldy + p1, T(0));
      if (saving) {  // never read by backward; kept defined
        for (int k = 0; k < Cell::kSaved; ++k)
          std::fill_n(p.gates + row * Cell::kSaved * H + k * H + j0, hs, T(0));
        if (proj) std::fill(p.m + row * H + j0, p.m + row * H + j1, T(0));
      }
    }
    if (!proj) {
      zoneout(io, t, n);
      reset_next(io, s);
      if (p.rec_mask && s + 1 < Tn) drop(io.hout, hdrop + ((s + 1) % 2) * Bn * P);
      if (bf16 && s + 1 < Tn) round_h((p.rec_mask ? hdrop : hbuf) + ((s + 1) % 2) * Bn * P, (s + 1) % 2);
    }
    team.sync();

    if (proj) {  // h = m W_hr^T for the running rows, split over the P outputs
      if (ps > 0 && n > 0)
        Gemm::run(w_proj, 0, w_proj.count(), n, mbuf, H, 1, T(0), nullptr, io.hout + p0, P);
      for (int64_t i = 0; i < n; ++i)
        std::copy(io.hout + i * P + p0, io.hout + i * P + p1, io.yt + order[i] * p.ldy + p0);
      zoneout(io, t, n);
      reset_next(io, s);  // after y took this step's h
      if (p.rec_mask && s + 1 < Tn) drop(io.hout, hdrop + ((s + 1) % 2) * Bn * P);
      if (bf16 && s + 1 < Tn) round_h((p.rec_mask ? hdrop : hbuf) + ((s + 1) % 2) * Bn * P, (s + 1) % 2);
      team.sync();
    }
  }

#ifdef FASTRNN_CPU_BF16
  if (amx) amx_end();
#endif
  // Final state back to the caller's row order.
  const T* hlast = hbuf + (Tn % 2) * Bn * P;
  const T* clast = cbuf + (Tn % 2) * Bn * H;
  for (int64_t i = 0; i < Bn; ++i) {
    std::copy(hlast + i * P + p0, hlast + i * P + p1, p.h_n + order[i] * P + p0);
    if (Cell::kHasCell) std::copy(clast + i * H + j0, clast + i * H + j1, p.c_n + order[i] * H + j0);
  }
}

template <class Cell, class Isa, class T>
void backward_team(const BackwardParams<T>& p, const Schedule& sched, T* ws, const Team& team) {
  using V = typename Isa::template V<T>;
  using Gemm = typename Isa::template Gemm<T>;
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  const int64_t Tn = p.T, B = p.B, H = p.H, P = p.P, GH = G * H;
  const bool proj = p.w_hr != nullptr;
  const Range hr = split(H, team.size, team.rank);
  const Range pr = proj ? split(P, team.size, team.rank) : hr;
  const int64_t j0 = hr.begin, j1 = hr.end, hs = hr.size();
  const int64_t p0 = pr.begin, p1 = pr.end, ps = pr.size();
  const int64_t* order = sched.order;
  const int64_t Bn = sched.rows;  // rows handled here; B stays the row stride of the tensors

  // Workspace, all in schedule order (row i = order[i]):
  T* dh = ws;                // [B, P] dL/dh carried to the previous step
  T* dc = dh + Bn * P;        // [B, H] dL/dc carried to the previous step (LSTM)
  T* dm = dc + Bn * H;        // [B, H] dL/d(output before projection) (proj)
  T* dg = dm + Bn * H;        // [2, B, G*H] this step's dgh, ping-pong: the GEMM of one
                             //             step may still read it while the next is written
  T* dzh = dg + 2 * Bn * GH;  // [B, P] zoneout: the part of dh that skips the cell
  T* dzc = dzh + Bn * P;      // [B, H] the same for dc
  T* drec = dzc + Bn * H;     // [B, P] dgates W_hh, before the recurrent dropout mask
  // Packed once for the whole sequence: the column slice W_hh[:, p0:p1] (K = G*H, N = ps)
  // and, with a projection, W_hr[:, j0:j1] (K = P, N = hs). The recurrent product takes
  // the GEMM tile that pads ps less (the bits are the same with either).
  using Wide = typename Gemm::Wider;
  auto padding = [ps](int64_t w) { return (ps + w - 1) / w * w - ps; };
  const bool wide = padding(Wide::kWidth) < padding(Gemm::kWidth);
  const int64_t rec_width = wide ? Wide::kWidth : Gemm::kWidth;
  Buffer<T> w_rec_mem, w_proj_mem;
  Panels<T> w_rec{nullptr, GH, ps, rec_width}, w_proj{nullptr, P, proj ? hs : 0, Gemm::kWidth};
  if (w_proj.N > 0) {
    w_proj_mem.resize(w_proj.count() * P * Gemm::kWidth);
    pack_panels<V>(p.w_hr + j0, H, 1, P, hs, Gemm::kWidth, 0, w_proj.count(), w_proj_mem.data);
    w_proj.data = w_proj_mem.data;
  }
  // bf16 products (bf16_products; H even, so that every thread's units of every gate
  // start on a pair): W_hh[:, p0:p1] as bf16 pairs along G*H in panels of the tile's width
  // instead, and the rows of dgates rounded once per step into d16 (pairs, ping-pong
  // [2, Bn, K2], K2 = G*H / 2, schedule order) by the threads that wrote them.
  // weights_in_place: dgates W_hh reads W_hh as it lies (unpacked_rows).
  const bool direct = weights_in_place(Tn, B, kInPlaceRows);
  const bool bf16 = !direct && H % 2 == 0 && bf16_products<Cell, Isa, T>(p.bf16_step, B, H, P);
  [[maybe_unused]] const bool amx = bf16 && amx_products<Cell, Isa>(B, H, P);
  const int64_t K2 = bf16_pairs(GH);
  [[maybe_unused]] int32_t* d16 = reinterpret_cast<int32_t*>(drec + Bn * P);
  Buffer<int32_t> w16;
  if (bf16) {
#ifdef FASTRNN_CPU_BF16
    if constexpr (std::is_same_v<T, float>) {
      w16.resize(std::max<int64_t>(1, (ps + rec_width - 1) / rec_width * K2 * rec_width));
      pack_columns_bf16(p.w_hh, GH, P, p0, ps, rec_width, w16.data);
      if (amx) amx_begin();
    }
#endif
  } else if (w_rec.N > 0 && !direct) {
    w_rec_mem.resize(w_rec.count() * GH * rec_width);
    pack_panels<V>(p.w_hh + p0, P, 1, GH, ps, rec_width, 0, w_rec.count(), w_rec_mem.data);
    w_rec.data = w_rec_mem.data;
  }
  // out[:n, p0:p1] (+)= a[:n] W_hh[:, p0:p1], a [n, G*H] (float32 products), or a16 its
  // pairs [n, K2] (bf16 products).
  auto recurrent = [&](const T* a, [[maybe_unused]] const int32_t* a16, int64_t n, T beta,
                       T* out) {
#ifdef FASTRNN_CPU_BF16
    if constexpr (std::is_same_v<T, float>) {
      if (amx) {
        if (wide)
          recurrent_amx<Wide::kNV, V>(w16.data, K2, ps, a16, n, beta, out + p0, P);
        else
          recurrent_amx<Gemm::kNV, V>(w16.data, K2, ps, a16, n, beta, out + p0, P);
        return;
      }
      if (bf16) {
        if (wide)
          recurrent_bf16<Wide::kMR, Wide::kNV, V>(w16.data, K2, GH / 2, ps, a16, n, beta,
                                                  out + p0, P);
        else
          recurrent_bf16<Gemm::kMR, Gemm::kNV, V>(w16.data, K2, GH / 2, ps, a16, n, beta,
                                                  out + p0, P);
        return;
      }
    }
#endif
    if (direct)
      unpacked_rows<Gemm::kNV, V, T>(n, ps, GH, a, GH, 1, p.w_hh + p0, P, beta, nullptr, out + p0,
                                      P);
    else if (wide)
      Wide::run(w_rec, 0, w_rec.count(), n, a, GH, 1, beta, nullptr, out + p0, P);
    else
      Gemm::run(w_rec, 0, w_rec.count(), n, a, GH, 1, beta, nullptr, out + p0, P);
  };

  for (int64_t i = 0; i < Bn; ++i) {
    const int64_t b = order[i];
    if (p.resets) {  // dh0/dc0 gather the gradients of the states replaced at resets
      std::fill(p.dh0 + b * P + p0, p.dh0 + b * P + p1, T(0));
      if (Cell::kHasCell) std::fill(p.dc0 + b * H + j0, p.dc0 + b * H + j1, T(0));
    }
    if (p.dh_n) std::copy(p.dh_n + b * P + p0, p.dh_n + b * P + p1, dh + i * P + p0);
    else std::fill(dh + i * P + p0, dh + i * P + p1, T(0));
    if (Cell::kHasCell) {
      if (p.dc_n) std::copy(p.dc_n + b * H + j0, p.dc_n + b * H + j1, dc + i * H + j0);
      else std::fill(dc + i * H + j0, dc + i * H + j1, T(0));
    }
  }

  // Zoneout's split of dc for row i at flat row `row`: c = z c_prev + (1 - z) c_cell, so
  // dzc takes the part that skips the cell (added back to dc after the gate gradients).
  auto zoneout_dc = [&](int64_t i, int64_t row) {
    if (!(Cell::kHasCell && p.zoneout_c)) return;
    for (int64_t j = j0; j < j1; ++j) {
      const T z = p.zoneout_c[row * H + j];
      dzc[i * H + j] = z * dc[i * H + j];
      dc[i * H + j] *= T(1) - z;
    }
  };

  // LayerNorm cells' Phase B for step t (running rows [0, n)): the cell's gate gradients;
  // for LnLstm first LN_c's backward (its blocks' sums, barrier, the row's means); then
  // LN_hh's: this thread's blocks' sums, (barrier) d(h W_hh^T) of its units, to draw and
  // to dgs for the recurrent product. Generic in the cell, so only these instantiate it.
  const int64_t nblk = norm_blocks(H), k0 = first_block(j0), k1 = end_block(j1);
  T* part = drec + Bn * P;            // [B, nblk, 2] sums for LN_hh (LayerNorm)
  T* part_c = part + 2 * Bn * nblk;   // [B, nblk, 2] sums for LN_c (LnLstm)
  auto ln_gradients = [&](auto cell, int64_t t, int64_t n, T* dgs) {
    using C = decltype(cell);
    // The cell's values (gates) of flat row `row`, units [j, j + L), recomputed as the
    // forward computed them, from the input parts and the saved norms.
    auto cell_values = [&](int64_t row, int64_t j, auto load, V (&sv)[C::kCellSaved]) {
      const T* norm = p.gates + row * C::kSaved * H;
      const T* x = p.gx + row * p.ldgx;
      V xg[G], hg[G], h, c(T(0));
      for (int g = 0; g < G; ++g) {
        const int64_t q = g * H + j;
        xg[g] = load(x + q) * load(p.gx_w + q) + load(p.gx_b + q);
        hg[g] = load(norm + q) * load(p.ln_w + q) + load(p.ln_b + q) +
                (p.b_hh ? load(p.b_hh + q) : V(T(0)));
      }
      if constexpr (C::kHasCell)
        C::state(xg, hg, V(T(0)), c, sv);  // the gates do not depend on c
      else
        C::forward(xg, hg, load(p.hprev + row * P + j), V(T(0)), h, c, sv);
    };
    for (int64_t i = n; i < Bn; ++i) {  // padded: no gradient; dh, dc pass through
      const int64_t row = t * B + order[i];
      for (int k = 0; k < G; ++k) {
        std::fill(p.dgx + row * p.ldg + k * H + j0, p.dgx + row * p.ldg + k * H + j1, T(0));
        std::fill(p.dgh + row * p.ldg + k * H + j0, p.dgh + row * p.ldg + k * H + j1, T(0));
        std::fill(p.draw + row * p.ldg + k * H + j0, p.draw + row * p.ldg + k * H + j1, T(0));
      }
      if (C::kHasCell) std::fill(p.dlnc + row * H + j0, p.dlnc + row * H + j1, T(0));
    }
    if constexpr (C::kHasCell) {
      for (int64_t i = 0; i < n; ++i) {  // h = o * tanh(u), u = lnc_w * norm(c) + lnc_b
        const int64_t row = t * B + order[i];
        const T* save = p.gates + row * C::kSaved * H;
        T* du = p.dlnc + row * H;
        zoneout_dc(i, row);
        for_vectors<V, T>(j0, j1, [&](int64_t j, auto load, auto store) {
          V sv[C::kCellSaved], dgo, duj;
          cell_values(row, j, load, sv);
          C::output_backward(sv[3], load(save + C::kNormC * H + j),
                             load(p.lnc_w + j), load(p.lnc_b + j), load(dh + i * P + j), dgo, duj);
          store(dgo, p.dgx + row * p.ldg + 3 * H + j);
          store(duj, du + j);
          // i, f, g wait in their gradients' places of dgx until the second pass.
          for (int k = 0; k < 3; ++k) store(sv[k], p.dgx + row * p.ldg + k * H + j);
        });
        for (int64_t k = k0; k < k1; ++k)
          block_sums<V>(du, save + C::kNormC * H, p.lnc_w, H, 1, k, part_c + (i * nblk + k) * 2);
      }
      team.sync();  // every block's sums for LN_c are in
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = t * B + order[i];
        const T* save = p.gates + row * C::kSaved * H;
        const T* cp = p.cprev + row * H;
        const T* du = p.dlnc + row * H;
        T* gx = p.dgx + row * p.ldg;
        T mean0, mean1;
        row_means(part_c + i * nblk * 2, H, 1, mean0, mean1);
        const T rstd = p.ln_rstd[row * 2 + 1];
        for_vectors<V, T>(j0, j1, [&](int64_t j, auto load, auto store) {
          const V dct = load(dc + i * H + j) +
                        norm_input_grad(load(p.lnc_w + j) * load(du + j),
                                        load(save + C::kNormC * H + j), V(rstd), V(mean0),
                                        V(mean1));
          V sv[3] = {load(gx + j), load(gx + H + j), load(gx + 2 * H + j)}, d[3], dcv;
          C::state_backward(sv, load(cp + j), dct, d, dcv);
          for (int k = 0; k < 3; ++k) store(d[k], gx + k * H + j);
          store(p.zoneout_c ? dcv + load(dzc + i * H + j) : dcv, dc + i * H + j);
          store(V(T(0)), dh + i * P + j);  // no direct part: only W_hh's reaches h_prev
        });
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = t * B + order[i];
        for_vectors<V, T>(j0, j1, [&](int64_t j, auto load, auto store) {
          V sv[C::kCellSaved], gx[C::kGates], gh[C::kGates], dhp, dcv(T(0));
          cell_values(row, j, load, sv);
          C::backward(sv, load(p.hprev + row * P + j), V(T(0)), load(dh + i * P + j), dcv, gx,
                      gh, dhp);
          for (int k = 0; k < G; ++k) {
            store(gx[k], p.dgx + row * p.ldg + k * H + j);
            store(gh[k], p.dgh + row * p.ldg + k * H + j);
          }
          store(dhp, dh + i * P + j);  // the direct part; the GEMM adds W_hh's
        });
      }
    }
    for (int64_t i = 0; i < n; ++i) {  // dgh: the gradient w.r.t. LN_hh's output
      const int64_t row = t * B + order[i];
      for (int64_t k = k0; k < k1; ++k)
        block_sums<V>(p.dgh + row * p.ldg, p.gates + row * C::kSaved * H, p.ln_w, H, G, k,
                      part + (i * nblk + k) * 2);
    }
    team.sync();  // every block's sums for LN_hh are in
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = t * B + order[i];
      const T* norm = p.gates + row * C::kSaved * H;
      const T* dg = p.dgh + row * p.ldg;
      T mean0, mean1;
      row_means(part + i * nblk * 2, H, G, mean0, mean1);
      const T rstd = p.ln_rstd[row * 2];
      for (int k = 0; k < G; ++k)
        for_vectors<V, T>(k * H + j0, k * H + j1, [&](int64_t j, auto load, auto store) {
          const V v = norm_input_grad(load(p.ln_w + j) * load(dg + j), load(norm + j), V(rstd),
                                      V(mean0), V(mean1));
          store(v, p.draw + row * p.ldg + j);
          store(v, dgs + i * GH + j);
        });
    }
  };

  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t t = time_of(s, Tn, p.reverse), n = sched.active[t];
    T* dgs = dg + (s % 2) * Bn * GH;

    // Phase A (P slice): total gradient w.r.t. this step's output h.
    for (int64_t i = 0; i < Bn; ++i) {
      const int64_t row = t * B + order[i];
      if (i < n && p.dy)
        for (int64_t q = p0; q < p1; ++q) dh[i * P + q] += p.dy[row * p.ldy + q];
      if (i < n && p.zoneout_h)  // h = z h_prev + (1 - z) h_cell: split dh between the two
        for (int64_t q = p0; q < p1; ++q) {
          const T z = p.zoneout_h[row * P + q];
          dzh[i * P + q] = z * dh[i * P + q];
          dh[i * P + q] *= T(1) - z;
        }
      if (proj)
        for (int64_t q = p0; q < p1; ++q) p.dhtot[row * P + q] = i < n ? dh[i * P + q] : T(0);
    }
    const T* dout = dh;  // gradient w.r.t. the cell output, ld = P (== H without projection)
    int64_t ld = P;
    if (proj) {
      team.sync();
      if (hs > 0 && n > 0)
        Gemm::run(w_proj, 0, w_proj.count(), n, dh, P, 1, T(0), nullptr, dm + j0, H);
      dout = dm;
      ld = H;
    }

    // Phase B (H slice): gate gradients, to dgx/dgh (caller's row order) and to dgs.
    if constexpr (Cell::kLayerNorm) {
      ln_gradients(Cell{}, t, n, dgs);
    } else {
    for (int64_t i = 0; i < Bn; ++i) {
      const int64_t row = t * B + order[i];
      T* gx = p.dgx + row * p.ldg;
      T* gh = p.dgh + row * p.ldg;
      if (i >= n) {  // padded: no gradient; dh, dc pass through
        for (int k = 0; k < G; ++k) {
          std::fill(gx + k * H + j0, gx + k * H + j1, T(0));
          if (Cell::kSplitGrad) std::fill(gh + k * H + j0, gh + k * H + j1, T(0));
        }
        continue;
      }
      const T* hp = Cell::kUsesPrevH ? p.hprev + row * P + j0 : nullptr;
      const T* cp = Cell::kHasCell ? p.cprev + row * H + j0 : nullptr;
      T* dcr = Cell::kHasCell ? dc + i * H + j0 : nullptr;
      const T* save = p.gates + row * S * H + j0;
      T* gc = dgs + i * GH + j0;  // compact copy for the GEMM below
      zoneout_dc(i, row);
      if (proj)
        backward_units<Cell, false>(hs, save, H, hp, cp, dout + i * ld + j0, dcr, gx + j0,
                                    Cell::kSplitGrad ? gh + j0 : nullptr, (T*)nullptr);
      else  // the GEMM below adds the W_hh part to the direct part written here
        backward_units<Cell, true>(hs, save, H, hp, cp, dout + i * ld + j0, dcr, gx + j0,
                                   Cell::kSplitGrad ? gh + j0 : nullptr, dh + i * P + j0);
      const T* src = Cell::kSplitGrad ? gh : gx;
      for (int k = 0; k < G; ++k) std::copy(src + k * H + j0, src + k * H + j1, gc + k * H);
#ifdef FASTRNN_CPU_BF16
      if constexpr (std::is_same_v<T, float>)
        if (bf16)  // the thread with the last units also writes the zero padding
          for (int k = 0; k < G; ++k)
            to_bf16_pairs(dgs + i * GH, k * H + j0,
                          k == G - 1 && j0 < j1 && j1 == H ? 2 * K2 : k * H + j1, GH,
                          d16 + ((s % 2) * Bn + i) * K2);
#endif
      if (Cell::kHasCell && p.zoneout_c)
        for (int64_t j = j0; j < j1; ++j) dc[i * H + j] += dzc[i * H + j];
    }
    }
    team.sync();

    // Phase C (P slice): dh_prev = direct part + dgh W_hh for the running rows; the
    // others keep dh as it was, so the gradient passes through padded steps unchanged.
    if (proj)
      for (int64_t i = 0; i < n; ++i) std::fill(dh + i * P + p0, dh + i * P + p1, T(0));
    const int32_t* dgs16 = bf16 ? d16 + (s % 2) * Bn * K2 : nullptr;
    if (ps > 0 && n > 0 && !p.rec_mask)
      recurrent(dgs, dgs16, n, T(1), dh);
    if (ps > 0 && n > 0 && p.rec_mask) {  // W_hh saw h * rec_mask
      recurrent(dgs, dgs16, n, T(0), drec);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t q = p0; q < p1; ++q)
          dh[i * P + q] += drec[i * P + q] * p.rec_mask[order[i] * P + q];
    }
    if (p.zoneout_h)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t q = p0; q < p1; ++q) dh[i * P + q] += dzh[i * P + q];

    // A state replaced at a reset was h0/c0: its gradient goes there and stops crossing
    // into the previous episode (this thread's columns of dh and dc, as written above).
    if (p.resets)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = order[i];
        if (!reset_before(p.resets, p.lengths, Tn, B, p.reverse, t, b)) continue;
        for (int64_t q = p0; q < p1; ++q) {
          p.dh0[b * P + q] += dh[i * P + q];
          dh[i * P + q] = T(0);
        }
        if (Cell::kHasCell)
          for (int64_t j = j0; j < j1; ++j) {
            p.dc0[b * H + j] += dc[i * H + j];
            dc[i * H + j] = T(0);
          }
      }
  }

#ifdef FASTRNN_CPU_BF16
  if (amx) amx_end();
#endif
  team.sync();  // dh of every column is final
  for (int64_t i = 0; i < Bn; ++i) {
    const int64_t b = order[i];
    if (p.resets) {  // add the gradient reaching the first step to what the resets gathered
      for (int64_t q = p0; q < p1; ++q) p.dh0[b * P + q] += dh[i * P + q];
      if (Cell::kHasCell)
        for (int64_t j = j0; j < j1; ++j) p.dc0[b * H + j] += dc[i * H + j];
      continue;
    }
    std::copy(dh + i * P + p0, dh + i * P + p1, p.dh0 + b * P + p0);
    if (Cell::kHasCell) std::copy(dc + i * H + j0, dc + i * H + j1, p.dc0 + b * H + j0);
  }
}

// Threads worth using for one direction: one per 16K multiply-adds per step, 0 when even
// one is too many to be worth a parallel region (below that the synchronisation costs more
// than the split saves).
inline int team_size(int64_t B, int64_t GH, int64_t P) {
  return static_cast<int>(std::max<int64_t>(B, 1) * GH * P / 16384);
}

// Runs fn(direction, team) for every direction. The directions run concurrently, each on
// its own share of the threads with its own barrier; one thread runs them in turn.
template <class Fn>
void run_directions(int ndir, int want, int max_threads, Fn&& fn) {
  SpinBarrier barriers[2];
  const int nthreads = std::max(1, std::min(max_threads, want * ndir));  // 1: run in turn
  if (nthreads == 1) {  // no parallel region: it would only add its own overhead
    for (int d = 0; d < ndir; ++d) fn(d, Team{0, 1, &barriers[d]});
    return;
  }
#pragma omp parallel num_threads(nthreads)
  {
    const int n = omp_get_num_threads(), tid = omp_get_thread_num();  // may be < nthreads
    const int split = ndir == 2 && n > 1 ? n / 2 : n;  // threads of direction 0
#pragma omp single
    {
      barriers[0].reset(split);
      barriers[1].reset(n - split);
    }
    if (ndir == 2 && n == 1) {
      fn(0, Team{0, 1, &barriers[0]});
      fn(1, Team{0, 1, &barriers[1]});
    } else if (tid < split) {
      fn(0, Team{tid, split, &barriers[0]});
    } else {
      fn(1, Team{tid - split, n - split, &barriers[1]});
    }
  }
}

// fn(cell policy) for the kind; layer_norm: the LayerNorm variant (LSTM and GRU only; the
// op layer checks the kind).
template <class Fn>
void dispatch_cell(CellKind kind, bool layer_norm, Fn&& fn) {
  switch (kind) {
    case CellKind::LSTM: layer_norm ? fn(LnLstm{}) : fn(Lstm{}); break;
    case CellKind::GRU: layer_norm ? fn(LnGru{}) : fn(Gru{}); break;
    case CellKind::RNN_TANH: fn(Rnn<false>{}); break;
    case CellKind::RNN_RELU: fn(Rnn<true>{}); break;
  }
}

// Thread plan: a team per direction splitting the hidden units (one barrier per step), or,
// for one direction with enough rows and a W_hh small enough to stream from every core's
// cache, each thread runs its own share of the batch with no barrier at all (sequences are
// independent). Rows are dealt out longest-first in turn, so every share keeps its running
// rows a prefix and the shares stay balanced under lengths.
struct Plan {
  int64_t rows_per_thread = 8;         // below this the row split starves the GEMMs
  int64_t max_weights = 512 * 1024;    // W_hh elements; above, each core reads only its slice
  std::vector<int64_t> order, active;  // per share: rows in schedule order; [T] running rows
  std::vector<Schedule> shares;
};

inline void make_plan(const int64_t* lengths, int64_t T, int64_t B, int64_t weights, int want,
                      int max_threads, int ndir, Plan& plan) {
  std::vector<int64_t> order(B), active(T);
  make_schedule(lengths, T, B, order.data(), active.data());
  const bool by_rows = ndir == 1 && want >= 2 && weights <= plan.max_weights;
  const int64_t n = by_rows ? std::min<int64_t>(max_threads, B / plan.rows_per_thread) : 1;
  const int64_t shares = std::max<int64_t>(n, 1);
  plan.order.resize(B);
  plan.active.resize(shares * T);
  plan.shares.resize(shares);
  int64_t* o = plan.order.data();
  for (int64_t k = 0; k < shares; ++k) {
    Schedule& sh = plan.shares[k];
    sh.order = o;
    for (int64_t i = k; i < B; i += shares) *o++ = order[i];
    sh.rows = o - sh.order;
    int64_t* act = plan.active.data() + k * T;
    for (int64_t t = 0; t < T; ++t) act[t] = std::max<int64_t>(0, (active[t] - k + shares - 1) / shares);
    sh.active = act;
  }
}

// Runs body(d, share, workspace, team) for every direction d < ndir and share of its rows.
template <class Params, class T, class Body>
void run_plan(const Params* p, int gates, int ndir, int want, int max_threads, int64_t per_share,
              T* const* ws, Body&& body) {
  Plan plan;
  const int64_t weights = static_cast<int64_t>(gates) * p[0].H * p[0].P;
  make_plan(p[0].lengths, p[0].T, p[0].B, weights, want, max_threads, ndir, plan);
  const int shares = static_cast<int>(plan.shares.size());
  if (shares > 1) {
#pragma omp parallel num_threads(shares)
    {
      SpinBarrier none;  // a share is a team of one
      for (int k = omp_get_thread_num(); k < shares; k += omp_get_num_threads())
        body(0, plan.shares[k], ws[0] + k * per_share, Team{0, 1, &none});
    }
    return;
  }
  run_directions(ndir, want, max_threads, [&](int d, const Team& team) {
    body(d, plan.shares[0], ws[d], team);
  });
}

// p[d], ws[d]: parameters and workspace (forward_workspace(p[0], G) * max_threads elements)
// of direction d < ndir (1 or 2). The directions share lengths, so they share one plan.
template <class Isa, class T>
void forward(CellKind kind, const ForwardParams<T>* p, int ndir, T* const* ws, int max_threads) {
  dispatch_cell(kind, p[0].layer_norm(), [&](auto cell) {
    using Cell = decltype(cell);
    run_plan(p, Cell::kGates, ndir, team_size(p[0].B, Cell::kGates * p[0].H, p[0].P), max_threads,
             forward_workspace(p[0], Cell::kGates), ws,
             [&](int d, const Schedule& sched, T* w, const Team& team) {
               forward_team<Cell, Isa>(p[d], sched, w, team);
             });
  });
}

template <class Isa, class T>
void backward(CellKind kind, const BackwardParams<T>* p, int ndir, T* const* ws,
              int max_threads) {
  dispatch_cell(kind, p[0].layer_norm(), [&](auto cell) {
    using Cell = decltype(cell);
    run_plan(p, Cell::kGates, ndir, team_size(p[0].B, Cell::kGates * p[0].H, p[0].P), max_threads,
             backward_workspace(p[0], Cell::kGates), ws,
             [&](int d, const Schedule& sched, T* w, const Team& team) {
               backward_team<Cell, Isa>(p[d], sched, w, team);
             });
  });
}

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn
