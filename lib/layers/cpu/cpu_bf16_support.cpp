// Whether this process may run the bf16 instructions of the CPU's sibling kernels
// (cpu_bf16_support.hpp). Compiled without any instruction-set flag: this is what decides whether
// those kernels may run at all.
//   AMX-BF16: cpuid leaf 7 (AMX-TILE, AMX-BF16), the OS saves the tile state (XCR0 bits 17 and 18),
//     and Linux grants the process the tile data's space (arch_prctl ARCH_REQ_XCOMP_PERM, once).
//   AVX-512 BF16: cpuid leaf 7 (AVX512F, BW and VL in subleaf 0, AVX512_BF16 in subleaf 1), and the
//     OS saves the state they use (XCR0: SSE, AVX, the mask registers, both upper vector halves).
#include "layers/cpu/cpu_bf16_support.hpp"

#include "relora/core/backend.hpp"

#if (defined(RELORA_WITH_AMX) || defined(RELORA_WITH_AVX512_BF16)) && (defined(__x86_64__) || defined(_M_X64))
#define RELORA_CPUID_CHECKS 1
#include <cpuid.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#endif
#if defined(RELORA_WITH_AMX) && defined(RELORA_CPUID_CHECKS) && defined(__linux__)
#define RELORA_AMX_CHECK 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace relora {

#if defined(RELORA_CPUID_CHECKS)
namespace {

constexpr unsigned kOsxsaveBit = 27;  // cpuid(1).ecx

// The state the OS saves (XCR0), or 0 where it does not let programs read it (no OSXSAVE).
std::uint64_t os_saved_state() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << kOsxsaveBit))) return 0;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (std::uint64_t(hi) << 32) | lo;
}

// cpuid leaf 7's registers for `subleaf`, all zero where the CPU has no such leaf or subleaf.
struct Leaf7 {
  unsigned a = 0, b = 0, c = 0, d = 0;
};
Leaf7 leaf7(unsigned subleaf) {
  Leaf7 r;
  if (__get_cpuid_max(0, nullptr) < 7) return r;
  __cpuid_count(7, 0, r.a, r.b, r.c, r.d);
  if (subleaf == 0) return r;
  if (r.a < subleaf) return Leaf7{};  // a: the highest subleaf
  __cpuid_count(7, subleaf, r.a, r.b, r.c, r.d);
  return r;
}

// Whether the environment variable `name` is set to 0 (the kernels turned off).
bool turned_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

}  // namespace
#endif

#if defined(RELORA_AMX_CHECK)
namespace {

constexpr unsigned kAmxBf16Bit = 22, kAmxTileBit = 24;                  // cpuid(7, 0).edx
constexpr std::uint64_t kTileStateBits = (1ull << 17) | (1ull << 18);  // XCR0: XTILECFG, XTILEDATA
constexpr long kArchRequestXcompPerm = 0x1023;
constexpr long kXfeatureTileData = 18;

bool decide_amx() {
  if (turned_off("RELORA_CPU_AMX")) return false;
  const Leaf7 leaf = leaf7(0);
  if (!(leaf.d & (1u << kAmxBf16Bit)) || !(leaf.d & (1u << kAmxTileBit))) return false;
  if ((os_saved_state() & kTileStateBits) != kTileStateBits) return false;
  return syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureTileData) == 0;
}

}  // namespace

bool amx_bf16_usable() {
  static const bool usable = decide_amx();
  return usable;
}
#else
bool amx_bf16_usable() { return false; }
#endif

#if defined(RELORA_WITH_AVX512_BF16) && defined(RELORA_CPUID_CHECKS)
namespace {

constexpr unsigned kAvx512fBit = 16, kAvx512bwBit = 30, kAvx512vlBit = 31;  // cpuid(7, 0).ebx
constexpr unsigned kAvx512Bf16Bit = 5;                                   // cpuid(7, 1).eax
constexpr std::uint64_t kVectorStateBits = 0xE6;  // XCR0: SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM

bool decide_avx512_bf16() {
  if (turned_off("RELORA_CPU_AVX512_BF16")) return false;
  const unsigned needed = (1u << kAvx512fBit) | (1u << kAvx512bwBit) | (1u << kAvx512vlBit);
  if ((leaf7(0).b & needed) != needed || !(leaf7(1).a & (1u << kAvx512Bf16Bit))) return false;
  return (os_saved_state() & kVectorStateBits) == kVectorStateBits;
}

}  // namespace

bool avx512_bf16_usable() {
  static const bool usable = decide_avx512_bf16();
  return usable;
}
#else
bool avx512_bf16_usable() { return false; }
#endif

bool cpu_amx_bf16_available() { return amx_bf16_usable(); }
bool cpu_avx512_bf16_available() { return avx512_bf16_usable(); }

}  // namespace relora
