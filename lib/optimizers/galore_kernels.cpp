#include "optimizers/galore_kernels.hpp"

namespace relora {

template <typename T>
std::unique_ptr<GaloreKernels<T>> make_galore_kernels(Backend<T>& backend, Index max_long, Index max_short) {
  switch (backend.device()) {
    case Device::cpu: return make_cpu_galore_kernels<T>();
    case Device::cuda:
#if defined(RELORA_WITH_CUDA)
      return make_cuda_galore_kernels<T>(backend, max_long, max_short);
#else
      break;
#endif
  }
  (void)max_long;
  (void)max_short;
  throw DeviceError("GaLore: no kernels for the backend's device (" + backend.description() + ")");
}

template std::unique_ptr<GaloreKernels<float>> make_galore_kernels(Backend<float>&, Index, Index);
template std::unique_ptr<GaloreKernels<double>> make_galore_kernels(Backend<double>&, Index, Index);

}  // namespace relora
