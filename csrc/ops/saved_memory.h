// Memory for the large CPU tensors the ops hand out: what a training forward saves for its
// backward (gates, hprev, cprev, m), the outputs and the gradients.
//
// They are written once, freed when the backward (or the caller) is done with them, and
// asked for again at the same sizes by the next step. glibc serves blocks of this size from
// fresh mappings or from the top of its heap, which it trims on free, so a fresh block
// comes back as new pages that the OS zero-fills on first touch: about 0.2 ms per MB, some
// 18 ms of CPU time per step of a B=64, H=512 LSTM. Freed blocks are kept here instead and
// handed out again, up to kMaxCachedBytes in all; release_saved_memory() gives them back
// to the OS (fastrnn.empty_cache()).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastrnn {

// at::empty(shape, opts) for a CPU tensor (resizable, an ordinary tensor in every other
// way), from the pool when it is large enough to be worth one.
at::Tensor pooled_empty(at::IntArrayRef shape, const at::TensorOptions& opts);

// Frees the cached blocks; blocks in use return to the OS when their tensors die.
void release_saved_memory();

// Bytes held in freed blocks, ready for reuse.
int64_t saved_memory_cached();

}  // namespace fastrnn
