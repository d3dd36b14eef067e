// Whether this process can run AMX-BF16 tile instructions: the CPU says so (cpuid leaf 7: AMX-TILE
// and AMX-BF16), the OS saves the tile state (XCR0 bits 17 and 18), and Linux grants the process
// the tile data's space (arch_prctl ARCH_REQ_XCOMP_PERM, asked once). Compiled without AMX flags:
// this is what decides whether the AMX kernels (frozen_base_kernels_amx.cpp) may run at all.
#include "layers/cpu/amx_support.hpp"

#include "relora/core/backend.hpp"

#if defined(RELORA_WITH_AMX) && defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#endif

namespace relora {

#if defined(RELORA_WITH_AMX) && defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
namespace {

constexpr unsigned kAmxBf16Bit = 22, kAmxTileBit = 24;         // cpuid(7, 0).edx
constexpr unsigned kOsxsaveBit = 27;                           // cpuid(1).ecx
constexpr std::uint64_t kTileStateBits = (1ull << 17) | (1ull << 18);  // XCR0: XTILECFG, XTILEDATA
constexpr long kArchRequestXcompPerm = 0x1023;
constexpr long kXfeatureTileData = 18;

bool cpu_and_os_have_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << kOsxsaveBit))) return false;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  if (!(d & (1u << kAmxBf16Bit)) || !(d & (1u << kAmxTileBit))) return false;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const std::uint64_t xcr0 = (std::uint64_t(hi) << 32) | lo;
  return (xcr0 & kTileStateBits) == kTileStateBits;
}

bool decide() {
  // RELORA_CPU_AMX=0 turns the AMX kernels off (the reference kernels then run everywhere).
  if (const char* v = std::getenv("RELORA_CPU_AMX"); v != nullptr && std::strcmp(v, "0") == 0) return false;
  if (!cpu_and_os_have_amx_bf16()) return false;
  return syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureTileData) == 0;
}

}  // namespace

bool amx_bf16_usable() {
  static const bool usable = decide();
  return usable;
}
#else
bool amx_bf16_usable() { return false; }
#endif

bool cpu_amx_bf16_available() { return amx_bf16_usable(); }

}  // namespace relora
