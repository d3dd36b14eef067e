#include "layers/frozen_base_kernels.hpp"

#include "relora/core/errors.hpp"

namespace relora {

std::unique_ptr<FrozenBaseKernels> make_frozen_base_kernels(Backend<float>& backend) {
  switch (backend.device()) {
    case Device::cpu: return make_cpu_frozen_base_kernels();
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
