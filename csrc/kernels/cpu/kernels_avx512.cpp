// The CPU kernels for avx512 (32 zmm registers: 24 accumulators; GEMM tile 8 rows x 3 vectors (48 floats)).
// Compiled with this instruction set's flags (CMakeLists.txt).
#define FASTRNN_CPU_ISA avx512
#define FASTRNN_CPU_BF16 1  // bf16_dot.h's step, on CPUs with AVX512_BF16
#include "recurrence.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {
using kIsa = Isa<64, 24, 8, 3>;
}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn

#include "kernels_impl.h"
