#pragma once
// AMX (Intel's Advanced Matrix Extensions) on the CPU backend: whether it may be used, and the
// kernels of a bf16 base that use it (frozen_base_kernels_amx.cpp, built where the compiler
// takes AMX's flags; RELORA_WITH_AMX is then defined).
#include <memory>

#include "layers/frozen_base_kernels.hpp"

namespace relora {

// Whether this process can run AMX-BF16 tile instructions (CPU, OS state and Linux's permission
// for the tile data, decided once); false where the library was built without the AMX kernels,
// off x86-64 or off Linux, and when the environment sets RELORA_CPU_AMX=0.
bool amx_bf16_usable();

#if defined(RELORA_WITH_AMX)
// The CPU kernels of a 16-bit base with a sibling for bf16 products on AMX tiles: while the
// backend's math mode is tf32, X W^T and dY W of a bf16 W round X (dY) to bf16 to nearest, as the
// CUDA backend always does, and multiply on the tiles with fp32 accumulation; everything else
// (strict mode, fp16, rounding, widening) is `reference`'s. Call only when amx_bf16_usable().
std::unique_ptr<FrozenBaseKernels> make_amx_frozen_base_kernels(Backend<float>& backend,
                                                                 std::unique_ptr<FrozenBaseKernels> reference);
#endif

}  // namespace relora
