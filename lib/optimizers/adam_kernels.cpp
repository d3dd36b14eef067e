#include "optimizers/adam_kernels.hpp"

namespace relora {

template <typename T>
std::unique_ptr<AdamKernels<T>> make_adam_kernels(Backend<T>& backend, std::vector<AdamSlot<T>> slots) {
  switch (backend.device()) {
    case Device::cpu: return make_cpu_adam_kernels<T>(std::move(slots));
    case Device::cuda:
#if defined(RELORA_WITH_CUDA)
      return make_cuda_adam_kernels<T>(backend, std::move(slots));
#else
      break;
#endif
  }
  throw DeviceError("Adam: no kernels for the backend's device (" + backend.description() + ")");
}

template std::unique_ptr<AdamKernels<float>> make_adam_kernels(Backend<float>&, std::vector<AdamSlot<float>>);
template std::unique_ptr<AdamKernels<double>> make_adam_kernels(Backend<double>&, std::vector<AdamSlot<double>>);

}  // namespace relora
