// CPU recurrence driver: runs the whole time loop of one layer (one or both directions),
// forward or backward, for any cell policy from cells.h. Torch-free; the caller supplies
// the GEMM.
//
// Parallel scheme: one OpenMP region lives for the whole sequence (see Plan below).
// Hidden split (weight-stationary): each thread of a direction's team owns a slice of
// hidden units across all gates, keeps its packed slice of W_hh hot in its own cache, runs
// its GEMM tile and then the gate math for that slice, and the team meets once per step at
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

namespace fastrnn {
namespace cpu {

// The caller provides the GEMM, for weights that stay fixed over the whole sequence:
//   auto w = gemm.pack(W, ldw, trans, K, N, M);
//       prepares op(W) [K, N] for products with M rows; W is [N, K] row-major (leading
//       dimension ldw) when trans, else [K, N]. Called once per thread before the loop.
//   gemm.run(w, m, A, lda, beta, C, ldc);
//       C[m, N] = A[m, K] op(W) + beta * C, row-major, for any m <= M.
//   auto guard = gemm.single_threaded();
//       keeps the BLAS on the calling thread while the guard lives: run() is called inside
//       the team, one call per thread and step.

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

template <class T>
inline int64_t forward_workspace(const ForwardParams<T>& p, int gates) {
  const int64_t GH = gates * p.H;
  return GH * p.P + p.B * GH + 2 * p.B * p.P + 3 * p.B * p.H + GH;
}

template <class T>
inline int64_t backward_workspace(const BackwardParams<T>& p, int gates) {
  return p.B * p.P + 2 * p.B * p.H + 2 * p.B * gates * p.H;
}

inline int64_t time_of(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// Gate math for units [0, n) of one batch row; pointers start at the row's first unit.
// Gate k of unit u sits at x[k*xs + u], bias[k*xs + u] and r[k*rs + u]. Branch-free, so the
// loop vectorises. (ivdep rather than omp simd: omp simd keeps the small per-unit arrays
// in memory as gathers, which defeats GCC's vectoriser.)
template <class Cell, bool Save, class T>
inline void forward_units(int64_t n, const T* x, const T* bias, int64_t xs, const T* r,
                          int64_t rs, const T* hp, const T* cp, T* h, T* c, T* save) {
  constexpr int G = Cell::kGates, S = Cell::kSaved;
#pragma GCC ivdep
  for (int64_t u = 0; u < n; ++u) {
    T xg[G], hg[G], sv[S], hv, cv = T(0);
#pragma GCC unroll 4
    for (int k = 0; k < G; ++k) {
      xg[k] = x[k * xs + u];
      hg[k] = r[k * rs + u] + bias[k * xs + u];
    }
    Cell::forward(xg, hg, Cell::kUsesPrevH ? hp[u] : T(0), Cell::kHasCell ? cp[u] : T(0), hv,
                  cv, sv);
    h[u] = hv;
    if constexpr (Cell::kHasCell) c[u] = cv;
    if constexpr (Save) {
#pragma GCC unroll 4
      for (int k = 0; k < S; ++k) save[k * xs + u] = sv[k];
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

template <class Cell, class T, class Gemm>
void forward_team(const ForwardParams<T>& p, const Schedule& sched, const Gemm& gemm, T* ws,
                  const Team& team) {
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  const int64_t Tn = p.T, B = p.B, H = p.H, P = p.P, GH = G * H;
  const bool proj = p.w_hr != nullptr, saving = p.saving();
  const Range hr = split(H, team.size, team.rank);
  const Range pr = proj ? split(P, team.size, team.rank) : hr;
  const int64_t j0 = hr.begin, j1 = hr.end, hs = hr.size();
  const int64_t p0 = pr.begin, p1 = pr.end, ps = pr.size();
  const int64_t* order = sched.order;
  const int64_t Bn = sched.rows;  // rows handled here; B stays the row stride of the tensors

  // Workspace. The running state is kept in schedule order (row i = order[i]).
  T* wpack = ws;               // [G*H, P] W_hh rows regrouped: thread slice at rows
                               //          [G*j0, G*j1), gate-major [G, hs, P] within it
  T* gh = wpack + GH * P;      // [Bn, G*H] recurrent pre-activations, per-thread [B, G*hs]
  T* hbuf = gh + Bn * GH;       // [2, B, P] ping-pong h, schedule order
  T* cbuf = hbuf + 2 * Bn * P;  // [2, B, H] ping-pong c, schedule order
  T* mbuf = cbuf + 2 * Bn * H;  // [B, H] output before projection, schedule order
  T* zeros = mbuf + Bn * H;     // [G*H] stands in for a missing b_hh
  if (!p.b_hh)  // each thread reads only its own units of every gate
    for (int k = 0; k < G; ++k) std::fill(zeros + k * H + j0, zeros + k * H + j1, T(0));
  const T* bias = p.b_hh ? p.b_hh : zeros;
  T* my_w = wpack + G * j0 * P;
  T* my_gh = gh + Bn * G * j0;

  for (int k = 0; k < G; ++k)
    for (int64_t j = j0; j < j1; ++j)
      std::copy_n(p.w_hh + (k * H + j) * P, P, my_w + (k * hs + j - j0) * P);
  const auto blas_guard = gemm.single_threaded();
  const auto w_rec = gemm.pack(my_w, P, true, P, G * hs, Bn);  // [P, G*hs]
  const auto w_proj = gemm.pack(proj ? p.w_hr + p0 * H : nullptr, H, true, H, proj ? ps : 0, Bn);

  // Initial state into schedule order; each thread copies the columns it will update.
  for (int64_t i = 0; i < Bn; ++i) {
    std::copy(p.h0 + order[i] * P + p0, p.h0 + order[i] * P + p1, hbuf + i * P + p0);
    if (Cell::kHasCell) std::copy(p.c0 + order[i] * H + j0, p.c0 + order[i] * H + j1, cbuf + i * H + j0);
  }
  team.sync();  // the first GEMM reads every column of h

  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = time_of(s, Tn, p.reverse), n = sched.active[t];
    const T* hin = hbuf + (s % 2) * Bn * P;
    T* hout = hbuf + ((s + 1) % 2) * Bn * P;
    const T* cin = cbuf + (s % 2) * Bn * H;
    T* cout = cbuf + ((s + 1) % 2) * Bn * H;
    T* yt = p.y + t * B * p.ldy;

    if (hs > 0 && n > 0) gemm.run(w_rec, n, hin, P, T(0), my_gh, G * hs);

    for (int64_t i = 0; i < Bn; ++i) {
      const int64_t row = t * B + order[i];
      if (saving) {  // what backward reads: the state entering this step
        std::copy(hin + i * P + p0, hin + i * P + p1, p.hprev + row * P + p0);
        if (Cell::kHasCell) std::copy(cin + i * H + j0, cin + i * H + j1, p.cprev + row * H + j0);
      }
      if (i >= n) {  // finished or not yet started: state passes through, output is zero
        if (Cell::kHasCell) std::copy(cin + i * H + j0, cin + i * H + j1, cout + i * H + j0);
        std::copy(hin + i * P + p0, hin + i * P + p1, hout + i * P + p0);
        std::fill(yt + order[i] * p.ldy + p0, yt + order[i] * p.ldy + p1, T(0));
        if (saving) {  // never read by backward; kept defined
          for (int k = 0; k < S; ++k) std::fill_n(p.gates + row * S * H + k * H + j0, hs, T(0));
          if (proj) std::fill(p.m + row * H + j0, p.m + row * H + j1, T(0));
        }
        continue;
      }
      const T* hp = Cell::kUsesPrevH ? hin + i * P + j0 : nullptr;
      const T* cp = Cell::kHasCell ? cin + i * H + j0 : nullptr;
      T* c = Cell::kHasCell ? cout + i * H + j0 : nullptr;
      T* h = proj ? mbuf + i * H + j0 : hout + i * P + j0;
      const T* x = p.gx + row * p.ldgx + j0;
      const T* r = my_gh + i * G * hs;
      if (saving)
        forward_units<Cell, true>(hs, x, bias + j0, H, r, hs, hp, cp, h, c,
                                  p.gates + row * S * H + j0);
      else
        forward_units<Cell, false>(hs, x, bias + j0, H, r, hs, hp, cp, h, c, (T*)nullptr);
      if (proj) {
        if (saving) std::copy(h, h + hs, p.m + row * H + j0);
      } else {
        std::copy(h, h + hs, yt + order[i] * p.ldy + j0);
      }
    }
    team.sync();

    if (proj) {  // h = m W_hr^T for the running rows, split over the P outputs
      if (ps > 0 && n > 0) gemm.run(w_proj, n, mbuf, H, T(0), hout + p0, P);
      for (int64_t i = 0; i < n; ++i)
        std::copy(hout + i * P + p0, hout + i * P + p1, yt + order[i] * p.ldy + p0);
      team.sync();
    }
  }

  // Final state back to the caller's row order.
  const T* hlast = hbuf + (Tn % 2) * Bn * P;
  const T* clast = cbuf + (Tn % 2) * Bn * H;
  for (int64_t i = 0; i < Bn; ++i) {
    std::copy(hlast + i * P + p0, hlast + i * P + p1, p.h_n + order[i] * P + p0);
    if (Cell::kHasCell) std::copy(clast + i * H + j0, clast + i * H + j1, p.c_n + order[i] * H + j0);
  }
}

template <class Cell, class T, class Gemm>
void backward_team(const BackwardParams<T>& p, const Schedule& sched, const Gemm& gemm, T* ws,
                   const Team& team) {
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
  const auto blas_guard = gemm.single_threaded();
  const auto w_rec = gemm.pack(p.w_hh + p0, P, false, GH, ps, Bn);  // [G*H, ps] column slice
  const auto w_proj = gemm.pack(proj ? p.w_hr + j0 : nullptr, H, false, P, proj ? hs : 0, Bn);

  for (int64_t i = 0; i < Bn; ++i) {
    const int64_t b = order[i];
    if (p.dh_n) std::copy(p.dh_n + b * P + p0, p.dh_n + b * P + p1, dh + i * P + p0);
    else std::fill(dh + i * P + p0, dh + i * P + p1, T(0));
    if (Cell::kHasCell) {
      if (p.dc_n) std::copy(p.dc_n + b * H + j0, p.dc_n + b * H + j1, dc + i * H + j0);
      else std::fill(dc + i * H + j0, dc + i * H + j1, T(0));
    }
  }

  for (int64_t s = Tn - 1; s >= 0; --s) {
    const int64_t t = time_of(s, Tn, p.reverse), n = sched.active[t];
    T* dgs = dg + (s % 2) * Bn * GH;

    // Phase A (P slice): total gradient w.r.t. this step's output h.
    for (int64_t i = 0; i < Bn; ++i) {
      const int64_t row = t * B + order[i];
      if (i < n && p.dy)
        for (int64_t q = p0; q < p1; ++q) dh[i * P + q] += p.dy[row * p.ldy + q];
      if (proj)
        for (int64_t q = p0; q < p1; ++q) p.dhtot[row * P + q] = i < n ? dh[i * P + q] : T(0);
    }
    const T* dout = dh;  // gradient w.r.t. the cell output, ld = P (== H without projection)
    int64_t ld = P;
    if (proj) {
      team.sync();
      if (hs > 0 && n > 0) gemm.run(w_proj, n, dh, P, T(0), dm + j0, H);
      dout = dm;
      ld = H;
    }

    // Phase B (H slice): gate gradients, to dgx/dgh (caller's row order) and to dgs.
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
      if (proj)
        backward_units<Cell, false>(hs, save, H, hp, cp, dout + i * ld + j0, dcr, gx + j0,
                                    Cell::kSplitGrad ? gh + j0 : nullptr, (T*)nullptr);
      else  // the GEMM below adds the W_hh part to the direct part written here
        backward_units<Cell, true>(hs, save, H, hp, cp, dout + i * ld + j0, dcr, gx + j0,
                                   Cell::kSplitGrad ? gh + j0 : nullptr, dh + i * P + j0);
      const T* src = Cell::kSplitGrad ? gh : gx;
      for (int k = 0; k < G; ++k) std::copy(src + k * H + j0, src + k * H + j1, gc + k * H);
    }
    team.sync();

    // Phase C (P slice): dh_prev = direct part + dgh W_hh for the running rows; the
    // others keep dh as it was, so the gradient passes through padded steps unchanged.
    if (proj)
      for (int64_t i = 0; i < n; ++i) std::fill(dh + i * P + p0, dh + i * P + p1, T(0));
    if (ps > 0 && n > 0) gemm.run(w_rec, n, dgs, GH, T(1), dh + p0, P);
  }

  team.sync();  // dh of every column is final
  for (int64_t i = 0; i < Bn; ++i) {
    const int64_t b = order[i];
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

template <class Fn>
void dispatch_cell(CellKind kind, Fn&& fn) {
  switch (kind) {
    case CellKind::LSTM: fn(Lstm{}); break;
    case CellKind::GRU: fn(Gru{}); break;
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

// Workspace elements per direction, for any plan (a row split needs one per share).
template <class T>
inline int64_t forward_workspace(const ForwardParams<T>& p, int gates, int max_threads) {
  return forward_workspace(p, gates) * std::max(1, max_threads);
}
template <class T>
inline int64_t backward_workspace(const BackwardParams<T>& p, int gates, int max_threads) {
  return backward_workspace(p, gates) * std::max(1, max_threads);
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

// p[d], ws[d]: parameters and workspace (forward_workspace(p[0], G, max_threads) elements)
// of direction d < ndir (1 or 2). The directions share lengths, so they share one plan.
template <class T, class Gemm>
void forward(CellKind kind, const ForwardParams<T>* p, int ndir, const Gemm& gemm, T* const* ws,
             int max_threads) {
  dispatch_cell(kind, [&](auto cell) {
    using Cell = decltype(cell);
    run_plan(p, Cell::kGates, ndir, team_size(p[0].B, Cell::kGates * p[0].H, p[0].P), max_threads,
             forward_workspace(p[0], Cell::kGates), ws,
             [&](int d, const Schedule& sched, T* w, const Team& team) {
               forward_team<Cell>(p[d], sched, gemm, w, team);
             });
  });
}

template <class T, class Gemm>
void backward(CellKind kind, const BackwardParams<T>* p, int ndir, const Gemm& gemm,
              T* const* ws, int max_threads) {
  dispatch_cell(kind, [&](auto cell) {
    using Cell = decltype(cell);
    run_plan(p, Cell::kGates, ndir, team_size(p[0].B, Cell::kGates * p[0].H, p[0].P), max_threads,
             backward_workspace(p[0], Cell::kGates), ws,
             [&](int d, const Schedule& sched, T* w, const Team& team) {
               backward_team<Cell>(p[d], sched, gemm, w, team);
             });
  });
}

}  // namespace cpu
}  // namespace fastrnn
