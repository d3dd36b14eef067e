#include "training/half_activation_kernels.hpp"

#include "relora/core/errors.hpp"

namespace relora {

std::unique_ptr<HalfActivationKernels> make_half_activation_kernels(Backend<float>& backend) {
  switch (backend.device()) {
    case Device::cpu: return make_cpu_half_activation_kernels();
    case Device::cuda:
#if defined(RELORA_WITH_CUDA)
      return make_cuda_half_activation_kernels(backend);
#else
      break;
#endif
  }
  throw DeviceError("16-bit activations: no kernels for the backend's device (" + backend.description() + ")");
}

}  // namespace relora
