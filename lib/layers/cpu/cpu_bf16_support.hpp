#pragma once
// Which bf16 instructions the CPU backend may use for a bf16 base's products in tf32 mode, decided
// once per process by cpu_bf16_support.cpp (compiled without any instruction-set flag), and the
// kernels that use them:
//   AMX tiles (Intel Xeon from Sapphire Rapids on): frozen_base_kernels_amx.cpp, built where the
//     compiler takes AMX's flags (RELORA_WITH_AMX is then defined);
//   AVX-512 BF16 dot products (AMD Zen 4 and later, Intel from Cooper Lake), for a CPU without AMX:
//     frozen_base_kernels_avx512_bf16.cpp, built where the compiler takes the instruction set as a
//     function attribute (RELORA_WITH_AVX512_BF16).
// Each sibling multiplies X W^T and dY W of a bf16 W with X (dY) rounded to bf16 to nearest, as the
// CUDA backend always does, with fp32 accumulation; everything else (strict mode, fp16, rounding,
// widening) is `reference`'s (CpuBf16SiblingKernels).
#include <memory>

#include "layers/frozen_base_kernels.hpp"

namespace relora {

// The CPU (cpuid: AMX-TILE and AMX-BF16), the OS (the tile state in XCR0) and Linux (the tile
// data's space, granted once) allow AMX-BF16; false without the AMX kernels, off x86-64 Linux, or
// with RELORA_CPU_AMX=0 in the environment.
bool amx_bf16_usable();
// The CPU (AVX512F, BW, VL and AVX512_BF16) and the OS (the vector and mask state in XCR0) allow
// AVX-512 BF16; false without those kernels, off x86-64, or with RELORA_CPU_AVX512_BF16=0.
bool avx512_bf16_usable();

#if defined(RELORA_WITH_AMX)
// Call only when amx_bf16_usable().
std::unique_ptr<FrozenBaseKernels> make_amx_frozen_base_kernels(Backend<float>& backend,
                                                                 std::unique_ptr<FrozenBaseKernels> reference);
#endif
#if defined(RELORA_WITH_AVX512_BF16)
// Call only when avx512_bf16_usable().
std::unique_ptr<FrozenBaseKernels> make_avx512_bf16_frozen_base_kernels(Backend<float>& backend,
                                                                         std::unique_ptr<FrozenBaseKernels> reference);
#endif

}  // namespace relora
