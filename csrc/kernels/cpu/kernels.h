// The CPU kernels of one instruction set, as a table of plain functions (torch-free).
// Each kernels_<isa>.cpp compiles the same sources (recurrence.h, gemm.h) with its own
// target flags; kernels() picks the best table this CPU supports from its feature flags
// (CPUID), never from its vendor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../cells.h"
#include "../params.h"

namespace fastrnn {
namespace cpu {

// C [M, N] = A op(B) (+ bias[N]) (+ C when beta == 1; beta is 0 or 1), row-major C with
// row stride ldc. A[m, k] is a[m * ars + k * aks] and op(B)[k, n] is b[k * bk + n * bn],
// so transposed operands need no copy. bias may be nullptr.
template <class T>
struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  const T* a = nullptr;
  int64_t ars = 0, aks = 0;
  const T* b = nullptr;
  int64_t bk = 0, bn = 0;
  T beta = 0;
  const T* bias = nullptr;
  T* c = nullptr;
  int64_t ldc = 0;
};

// Workspace elements of one direction of one layer, per thread (a thread plan may give
// every thread its own share of the rows): the running state in schedule order.
// LayerNorm cells add the row statistics' parts: two [B, blocks of 16 units, 2].
inline int64_t layer_norm_parts(int64_t B, int64_t H) { return 4 * B * ((H + 15) / 16); }
// The bf16 recurrent products hold a row of K values as ceil(K / 2) pairs, padded with
// zeros to a multiple of 16 (the K chunk of an AMX tile, amx.h), and their buffers of
// rows are readable 16 rows past the last (an AMX tile reads 16 rows at a time).
inline int64_t bf16_pairs(int64_t K) { return ((K + 1) / 2 + 15) / 16 * 16; }
template <class T>
inline int64_t forward_workspace(const ForwardParams<T>& p, int gates) {
  // h, c ping-pong; m; zero bias; h * rec_mask ping-pong; LayerNorm or one step: h W_hh^T;
  // LayerNorm: parts; bf16 step: bf16 pairs of h, ping-pong (32-bit values)
  return 2 * p.B * p.P + 3 * p.B * p.H + gates * p.H + 2 * p.B * p.P +
         (p.layer_norm() || p.T == 1 ? p.B * gates * p.H : 0) +
         (p.layer_norm() ? layer_norm_parts(p.B, p.H) : 0) +
         (p.bf16_step ? (2 * p.B + 16) * bf16_pairs(p.P) : 0);
}
template <class T>
inline int64_t backward_workspace(const BackwardParams<T>& p, int gates) {
  // dh, dc, dm; dgates ping-pong; zoneout's direct parts of dh and dc; dgates W_hh;
  // LayerNorm: parts; bf16 step: bf16 pairs of dgates, ping-pong (32-bit values)
  return p.B * p.P + 2 * p.B * p.H + 2 * p.B * gates * p.H + p.B * (p.P + p.H) + p.B * p.P +
         (p.layer_norm() ? layer_norm_parts(p.B, p.H) : 0) +
         (p.bf16_step ? (2 * p.B + 16) * bf16_pairs(gates * p.H) : 0);
}

struct Kernels {
  const char* name;  // "avx512", "avx2" or "portable"
  // The time loop of one layer: p[d], ws[d] for each direction d < ndir (recurrence.h).
  void (*forward_f32)(CellKind, const ForwardParams<float>*, int ndir, float* const* ws,
                      int threads);
  void (*forward_f64)(CellKind, const ForwardParams<double>*, int ndir, double* const* ws,
                      int threads);
  void (*backward_f32)(CellKind, const BackwardParams<float>*, int ndir, float* const* ws,
                       int threads);
  void (*backward_f64)(CellKind, const BackwardParams<double>*, int ndir, double* const* ws,
                       int threads);
  // A large GEMM over `threads` threads; the same bits for any thread count.
  void (*gemm_f32)(const GemmArgs<float>&, int threads);
  void (*gemm_f64)(const GemmArgs<double>&, int threads);
  // out[c] = sum over rows r (in order) of t[r * rs + c * cs], c < C, and when u is not
  // nullptr out_u[c] = the same sum of t times u[r * us + c * cs], in the same pass: bias
  // and LayerNorm gradients.
  void (*column_sum_f32)(const float* t, int64_t R, int64_t C, int64_t rs, int64_t cs,
                         float* out, int threads, const float* u, int64_t us, float* out_u);
  void (*column_sum_f64)(const double* t, int64_t R, int64_t C, int64_t rs, int64_t cs,
                         double* out, int threads, const double* u, int64_t us, double* out_u);
  // The measured multiply-add limit in GFLOP/s: independent vector FMAs in registers on
  // `threads` threads for about `seconds` (fma_peak.h).
  double (*fma_peak_f32)(int threads, double seconds);
  double (*fma_peak_f64)(int threads, double seconds);
  // Whether the bf16 recurrent step (ForwardParams::bf16_step) also runs past the narrow
  // tiles: vdpbf16ps outpaces float32 FMAs on this CPU (bf16_dot.h). False without it.
  bool (*bf16_step_wide)();
  // Whether the bf16 recurrent step runs its products past the narrow tiles on AMX tiles
  // (amx.h): the CPU has AMX-BF16, the OS grants the tile state and allow_amx is on.
  bool (*bf16_step_amx)();
};

// The table in use: the best this CPU supports, unless set_kernels chose another.
const Kernels& kernels();
// Names of the tables this build has and this CPU can run, best first.
std::vector<std::string> supported_kernels();
// The CPU's features that matter to the kernels, from CPUID: "fma", "avx2", "avx512f",
// "avx512_bf16", "amx_bf16" (hardware flags; whether the OS lets a process use AMX is
// another question).
std::vector<std::string> cpu_features();
// Whether cpu_features() has `name` (read once per call of cpu_features; callers keep it).
bool cpu_has(const std::string& name);
// Use the named table from now on (testing and benchmarking); false if unsupported.
bool set_kernels(const std::string& name);
// Whether the bf16 recurrent products may use AMX tiles where the CPU and OS have them
// (default true); allow_amx sets it (testing and benchmarking: the other bf16 step on the
// same CPU) and returns what it was.
bool amx_allowed();
bool allow_amx(bool on);

}  // namespace cpu
}  // namespace fastrnn
