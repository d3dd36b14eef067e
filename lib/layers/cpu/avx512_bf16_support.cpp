// Whether this process can run AVX-512 BF16 instructions: the CPU says so (cpuid leaf 7: AVX512F,
// AVX512BW and AVX512VL in subleaf 0, AVX512_BF16 in subleaf 1) and the OS saves the state they
// use (XCR0: SSE, AVX, the mask registers and both halves of the upper vector registers).
// Compiled without AVX-512 flags: this is what decides whether the kernels of
// frozen_base_kernels_avx512_bf16.cpp may run at all.
#include "layers/cpu/avx512_bf16_support.hpp"

#include "relora/core/backend.hpp"

#if defined(RELORA_WITH_AVX512_BF16) && (defined(__x86_64__) || defined(_M_X64))
#include <cpuid.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#endif

namespace relora {

#if defined(RELORA_WITH_AVX512_BF16) && (defined(__x86_64__) || defined(_M_X64))
namespace {

constexpr unsigned kOsxsaveBit = 27;                                     // cpuid(1).ecx
constexpr unsigned kAvx512fBit = 16, kAvx512bwBit = 30, kAvx512vlBit = 31;  // cpuid(7, 0).ebx
constexpr unsigned kAvx512Bf16Bit = 5;                                   // cpuid(7, 1).eax
constexpr std::uint64_t kVectorStateBits = 0xE6;  // XCR0: SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM

bool cpu_and_os_have_avx512_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << kOsxsaveBit))) return false;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned needed = (1u << kAvx512fBit) | (1u << kAvx512bwBit) | (1u << kAvx512vlBit);
  if ((b & needed) != needed || a < 1) return false;  // a: the highest subleaf of leaf 7
  __cpuid_count(7, 1, a, b, c, d);
  if (!(a & (1u << kAvx512Bf16Bit))) return false;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const std::uint64_t xcr0 = (std::uint64_t(hi) << 32) | lo;
  return (xcr0 & kVectorStateBits) == kVectorStateBits;
}

bool decide() {
  // RELORA_CPU_AVX512_BF16=0 turns the kernels off (the reference kernels then run).
  if (const char* v = std::getenv("RELORA_CPU_AVX512_BF16"); v != nullptr && std::strcmp(v, "0") == 0) return false;
  return cpu_and_os_have_avx512_bf16();
}

}  // namespace

bool avx512_bf16_usable() {
  static const bool usable = decide();
  return usable;
}
#else
bool avx512_bf16_usable() { return false; }
#endif

bool cpu_avx512_bf16_available() { return avx512_bf16_usable(); }

}  // namespace relora
