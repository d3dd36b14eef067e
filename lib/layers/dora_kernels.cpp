#include "layers/dora_kernels.hpp"

#include "relora/core/errors.hpp"

namespace relora {

template <typename T>
std::unique_ptr<DoraKernels<T>> make_dora_kernels(Backend<T>& backend) {
  switch (backend.device()) {
    case Device::cpu: return make_cpu_dora_kernels<T>();
    case Device::cuda:
#if defined(RELORA_WITH_CUDA)
      return make_cuda_dora_kernels<T>(backend);
#else
      break;
#endif
  }
  throw DeviceError("DoraLinear: no kernels for the backend's device (" + backend.description() + ")");
}

template std::unique_ptr<DoraKernels<float>> make_dora_kernels(Backend<float>&);
template std::unique_ptr<DoraKernels<double>> make_dora_kernels(Backend<double>&);

}  // namespace relora
