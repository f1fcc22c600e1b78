#include "saved_memory.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace fastrnn {
namespace {

// Smaller tensors come from torch's allocator: glibc's heap reuses them (it maps or trims
// from about 128 KiB).
constexpr size_t kMinBytes = size_t(256) << 10;
// Freed blocks kept for reuse, in bytes, at most; the oldest go first. Never more than the
// most the pool's tensors held at once either: a steady training step gets all its blocks
// back, while calls of ever-changing sizes (inference on variable lengths) keep no more
// than one working set of blocks they cannot use.
constexpr size_t kMaxCachedBytes = size_t(1) << 30;

struct Block {
  void* mem;
  size_t bytes;
};

class Pool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    Block* b = take(n);
    if (!b) b = new Block{c10::alloc_cpu(n), n};
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_ += b->bytes;
      peak_in_use_ = std::max(peak_in_use_, in_use_);
    }
    return {b->mem, b, &Pool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void release() {
    std::vector<Block*> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      out.swap(free_);
      cached_ = 0;
      peak_in_use_ = in_use_;
    }
    for (Block* b : out) destroy(b);
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  // The smallest free block of at least n bytes, if it wastes at most half of n.
  Block* take(size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    int best = -1;
    for (const int i : c10::irange(static_cast<int>(free_.size()))) {
      const size_t b = free_[i]->bytes;
      if (b >= n && b <= n + n / 2 && (best < 0 || b < free_[best]->bytes)) best = i;
    }
    if (best < 0) return nullptr;
    Block* b = free_[best];
    free_.erase(free_.begin() + best);
    cached_ -= b->bytes;
    return b;
  }

  void put(Block* b) {
    std::vector<Block*> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(b);
      cached_ += b->bytes;
      in_use_ -= b->bytes;
      while (cached_ > std::min(kMaxCachedBytes, peak_in_use_)) {
        out.push_back(free_.front());
        cached_ -= free_.front()->bytes;
        free_.erase(free_.begin());
      }
    }
    for (Block* old : out) destroy(old);
  }

  static void destroy(Block* b) {
    c10::free_cpu(b->mem);
    delete b;
  }

  static void give_back(void* ctx);

  std::mutex mu_;
  std::vector<Block*> free_;  // oldest first
  size_t cached_ = 0;
  size_t in_use_ = 0, peak_in_use_ = 0;  // bytes of the blocks the pool's tensors hold
};

// Never destroyed: a tensor can outlive the static destructors.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void Pool::give_back(void* ctx) { pool().put(static_cast<Block*>(ctx)); }

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef shape, const at::TensorOptions& opts) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(shape)) * opts.dtype().itemsize();
  // torch.utils.deterministic.fill_uninitialized_memory: at::empty fills in NaN.
  const bool fill = at::globalContext().deterministicAlgorithms() &&
                    at::globalContext().deterministicFillUninitializedMemory();
  if (opts.device().type() != c10::DeviceType::CPU || bytes < kMinBytes || fill)
    return at::empty(shape, opts);
  return at::Tensor(at::detail::empty_generic(shape, &pool(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              opts.dtype().toScalarType(), c10::nullopt));
}

void release_saved_memory() { pool().release(); }

int64_t saved_memory_cached() { return static_cast<int64_t>(pool().cached()); }

}  // namespace fastrnn
