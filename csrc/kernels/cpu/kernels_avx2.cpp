// The CPU kernels for avx2 (16 ymm registers: 12 accumulators; GEMM tile 6 rows x 2 vectors (16 floats)).
// Compiled with this instruction set's flags (CMakeLists.txt).
#define FASTRNN_CPU_ISA avx2
#include "recurrence.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {
using kIsa = Isa<32, 12, 6, 2>;
}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn

#include "kernels_impl.h"
