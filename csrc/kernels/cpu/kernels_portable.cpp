// The CPU kernels for portable (16-byte vectors (SSE2 on x86-64, NEON on Arm), 12 accumulators; GEMM tile 6 x 2).
// Compiled with this instruction set's flags (CMakeLists.txt).
#define FASTRNN_CPU_ISA portable
#include "recurrence.h"

namespace fastrnn {
namespace cpu {
inline namespace FASTRNN_CPU_ISA {
using kIsa = Isa<16, 12, 6, 2>;
}  // namespace FASTRNN_CPU_ISA
}  // namespace cpu
}  // namespace fastrnn

#include "kernels_impl.h"
