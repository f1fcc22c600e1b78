// AMX-BF16 tiles for the bf16 recurrent products (bf16_dot.h's pairs layout): one
// tdpbf16ps multiplies a 16 x 32 bf16 block by a 32 x 16 one into 16 x 16 float32 sums,
// 16 times the multiply-adds of a vdpbf16ps per instruction. An LSTM step at B=16..64 is
// bound by multiply-adds, so on a CPU with AMX-BF16 it runs its product on the tiles.
// Only in the AVX-512 kernels (FASTRNN_CPU_BF16), only on a CPU whose CPUID has AMX-BF16
// and whose OS grants the process the tile state (Linux: arch_prctl), and only while
// allow_amx(true) (the default; tests and benchmarks turn it off to compare).
//
// Every tile here is 16 rows of 64 bytes: A, 16 rows of 16 pairs (32 bf16 of one row of
// h or dgates); B, 16 pair-rows of 16 columns (pairs along k, as pack_gates_bf16 and
// pack_columns_bf16 lay them out); C, 16 rows x 16 float32 sums. K runs in chunks of 16
// pairs, which bf16_pairs' padding with zeros gives every row of pairs, and the buffers of
// A rows are readable past their last row (kernels.h; the sums of rows past the last are
// computed and dropped).
#pragma once

#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {

// Whether this process may run tile instructions: the CPU has AMX-BF16 and the OS gave the
// process the tile state (asked once; Linux 5.16+ grants it per process, on request).
inline bool amx_granted() {
  static const bool on = [] {
    if (!cpu_has("amx_bf16")) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return on;
}

inline bool amx_usable() { return amx_allowed() && amx_granted(); }

// The tile configuration (palette 1) with all 8 tiles 16 rows x 64 bytes, loaded by each
// thread before its first tile instruction (the configuration is per thread) and released
// after its last, so no other code on the thread finds tiles configured. A constant: GCC
// drops stores to a local configuration that only ldtilecfg reads.
struct AmxConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(AmxConfig) == 64, "ldtilecfg reads 64 bytes");
inline constexpr AmxConfig kAmxConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

__attribute__((target("amx-tile"))) inline void amx_begin() { _tile_loadconfig(&kAmxConfig); }

__attribute__((target("amx-tile"))) inline void amx_end() { _tile_release(); }

// out[r][c] = sum over k of a[r][k] * panel[k][c] for 16 rows and the NC * 16 columns of
// a panel of pairs [K2][W] (W >= NC * 16 its width: pack_columns_bf16's panels, or
// pack_gates_bf16's block of 16 units, whose G gates are its G * 16 columns), a at
// a + r * lda (lda pairs per row; K2 pairs, a multiple of 16). out: [16][NC * 16] float32.
// Tiles: C = column block (0..NC-1), A = 4, B = 5..7 in turn.
template <int NC>
__attribute__((target("amx-tile,amx-bf16"), noinline)) void amx_panel(int64_t K2, const int32_t* a,
                                                                       int64_t lda,
                                                                       const int32_t* panel,
                                                                       int64_t W, float* out) {
  static_assert(NC >= 1 && NC <= 4, "one C tile per 16 columns, 4 at most");
  const int64_t ldb = W * 4;
  constexpr int64_t kOut = NC * 64;  // bytes per row of out
  _tile_zero(0);
  if constexpr (NC > 1) _tile_zero(1);
  if constexpr (NC > 2) _tile_zero(2);
  if constexpr (NC > 3) _tile_zero(3);
  for (int64_t k = 0; k < K2; k += 16) {
    const int32_t* b = panel + k * W;
    _tile_loadd(4, a + k, lda * 4);
    _tile_loadd(5, b, ldb);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NC > 1) {
      _tile_loadd(6, b + 16, ldb);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NC > 2) {
      _tile_loadd(7, b + 32, ldb);
      _tile_dpbf16ps(2, 4, 7);
    }
    if constexpr (NC > 3) {
      _tile_loadd(5, b + 48, ldb);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, out, kOut);
  if constexpr (NC > 1) _tile_stored(1, out + 16, kOut);
  if constexpr (NC > 2) _tile_stored(2, out + 32, kOut);
  if constexpr (NC > 3) _tile_stored(3, out + 48, kOut);
}

// out[i, c] (+)= sum over k of a[i, k] * b[k, c] for rows [0, n), columns [0, nc), as
// recurrent_bf16 (bf16_dot.h) computes it, on the tiles: a as pairs [n, K2] (row stride
// K2, readable 16 rows past n), b as pack_columns_bf16's panels of NV * 16 columns
// ([ceil(nc / (NV * 16))][K2][NV * 16] pairs), out [n, ldo]; beta 0 (write) or 1 (add).
// Each panel (in L2) serves every block of 16 rows in turn.
template <int NV, class V>
void recurrent_amx(const int32_t* panels, int64_t K2, int64_t nc, const int32_t* a, int64_t n,
                   float beta, float* out, int64_t ldo) {
  constexpr int W = NV * 16;
  alignas(64) float sums[16 * W];  // [16 rows][W columns]
  for (int64_t c0 = 0; c0 < nc; c0 += W) {
    const int64_t m = std::min<int64_t>(W, nc - c0);
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
      amx_panel<NV>(K2, a + i0 * K2, K2, panels + c0 * K2, W, sums);
      for (int64_t r = 0; r < std::min<int64_t>(16, n - i0); ++r) {
        float* o = out + (i0 + r) * ldo + c0;
        for (int64_t c = 0; c < m; c += 16) {
          const int k = static_cast<int>(std::min<int64_t>(16, m - c));
          const float* q = sums + r * W + c;
          V v = k == 16 ? V::load(q) : V::load(q, k);
          if (beta != 0) v = v + (k == 16 ? V::load(o + c) : V::load(o + c, k));
          k == 16 ? v.store(o + c) : v.store(o + c, k);
        }
      }
    }
  }
}

}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn
