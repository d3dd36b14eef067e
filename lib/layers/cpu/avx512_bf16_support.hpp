#pragma once
// AVX-512 BF16 on the CPU backend: whether it may be used, and the kernels of a bf16 base that use
// it (frozen_base_kernels_avx512_bf16.cpp, built where the compiler takes the instruction set as a
// function attribute; RELORA_WITH_AVX512_BF16 is then defined). For CPUs with AVX512_BF16 and
// without AMX (AMD Zen 4 and later, Intel Cooper Lake); where AMX is usable its kernels run instead.
#include <memory>

#include "layers/frozen_base_kernels.hpp"

namespace relora {

// Whether this process can run AVX-512 BF16 instructions (the CPU has AVX512F, AVX512BW,
// AVX512VL and AVX512_BF16, and the OS saves the vector and mask registers; decided once); false
// where the library was built without the kernels, off x86-64, and when the environment sets
// RELORA_CPU_AVX512_BF16=0.
bool avx512_bf16_usable();

#if defined(RELORA_WITH_AVX512_BF16)
// The CPU kernels of a 16-bit base with a sibling for bf16 products on AVX-512 BF16 dot products:
// while the backend's math mode is tf32, X W^T and dY W of a bf16 W round X (dY) to bf16 to
// nearest, as the CUDA backend always does, and multiply with fp32 accumulation; everything else
// (strict mode, fp16, rounding, widening) is `reference`'s. Call only when avx512_bf16_usable().
std::unique_ptr<FrozenBaseKernels> make_avx512_bf16_frozen_base_kernels(Backend<float>& backend,
                                                                         std::unique_ptr<FrozenBaseKernels> reference);
#endif

}  // namespace relora
