#include "layers/frozen_base_kernels.hpp"

#include "layers/cpu/cpu_bf16_support.hpp"

#include "relora/core/errors.hpp"

namespace relora {

std::unique_ptr<FrozenBaseKernels> make_frozen_base_kernels(Backend<float>& backend) {
  switch (backend.device()) {
    case Device::cpu: {
      auto reference = make_cpu_frozen_base_kernels();
#if defined(RELORA_WITH_AMX)
      if (amx_bf16_usable()) return make_amx_frozen_base_kernels(backend, std::move(reference));
#endif
#if defined(RELORA_WITH_AVX512_BF16)
      if (avx512_bf16_usable()) return make_avx512_bf16_frozen_base_kernels(backend, std::move(reference));
#endif
      return reference;
    }
    case Device::cuda:
#if defined(RELORA_WITH_CUDA)
      return make_cuda_frozen_base_kernels(backend);
#else
      break;
#endif
  }
  throw DeviceError("a bf16 or fp16 base: no kernels for the backend's device (" + backend.description() + ")");
}

}  // namespace relora
