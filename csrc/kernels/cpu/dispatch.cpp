// Picks the CPU kernels from the CPU's feature flags (CPUID), never from its vendor.
#include <algorithm>
#include <atomic>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "kernels.h"

namespace fastrnn {
namespace cpu {

#define FASTRNN_DECLARE_TABLE(isa) \
  inline namespace isa {           \
  const Kernels& table();          \
  }
FASTRNN_DECLARE_TABLE(portable)
#if defined(__x86_64__) || defined(__i386__)
FASTRNN_DECLARE_TABLE(avx2)
FASTRNN_DECLARE_TABLE(avx512)
#endif
#undef FASTRNN_DECLARE_TABLE

namespace {

struct Candidate {
  const Kernels& (*table)();
  bool (*supported)();
};

// Best first. __builtin_cpu_supports also checks that the OS saves the wide registers.
const Candidate kCandidates[] = {
#if defined(__x86_64__) || defined(__i386__)
    {&avx512::table,
     [] {
       return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
              __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
              __builtin_cpu_supports("fma");
     }},
    {&avx2::table, [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }},
#endif
    {&portable::table, [] { return true; }},
};

const Kernels* best() {
  for (const Candidate& c : kCandidates)
    if (c.supported()) return &c.table();
  return &portable::table();
}

std::atomic<const Kernels*> current{nullptr};
std::atomic<bool> amx_on{true};

}  // namespace

const Kernels& kernels() {
  const Kernels* k = current.load(std::memory_order_acquire);
  if (!k) {
    k = best();
    current.store(k, std::memory_order_release);
  }
  return *k;
}

std::vector<std::string> supported_kernels() {
  std::vector<std::string> names;
  for (const Candidate& c : kCandidates)
    if (c.supported()) names.push_back(c.table().name);
  return names;
}

std::vector<std::string> cpu_features() {
  std::vector<std::string> out;
#if defined(__x86_64__) || defined(__i386__)
  const std::pair<const char*, bool> flags[] = {
      {"fma", __builtin_cpu_supports("fma")},
      {"avx2", __builtin_cpu_supports("avx2")},
      {"avx512f", __builtin_cpu_supports("avx512f")},
  };
  for (const auto& [name, on] : flags)
    if (on) out.push_back(name);
  // CPUID leaf 7: sub-leaf 1 EAX bit 5 is AVX512_BF16, sub-leaf 0 EDX bit 22 AMX-BF16.
  unsigned a, b, c, d;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1) && __builtin_cpu_supports("avx512f"))
    out.push_back("avx512_bf16");
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1)) out.push_back("amx_bf16");
#endif
  return out;
}

bool cpu_has(const std::string& name) {
  const std::vector<std::string> f = cpu_features();
  return std::find(f.begin(), f.end(), name) != f.end();
}

bool set_kernels(const std::string& name) {
  for (const Candidate& c : kCandidates)
    if (c.supported() && name == c.table().name) {
      current.store(&c.table(), std::memory_order_release);
      return true;
    }
  return false;
}

bool amx_allowed() { return amx_on.load(std::memory_order_relaxed); }
bool allow_amx(bool on) { return amx_on.exchange(on, std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace fastrnn
