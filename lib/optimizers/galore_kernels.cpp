#include "optimizers/galore_kernels.hpp"

namespace relora {

template <typename T>
std::unique_ptr<GaloreKernels<T>> make_galore_kernels(Backend<T>& backend, Index max_rows, Index max_cols) {
  switch (backend.device()) {
    case Device::cpu: return make_cpu_galore_kernels<T>();
    case Device::cuda:
#if defined(RELORA_WITH_CUDA)
      return make_cuda_galore_kernels<T>(backend, max_rows, max_cols);
#else
      break;
#endif
  }
  (void)max_rows;
  (void)max_cols;
  throw DeviceError("GaLore: no kernels for the backend's device (" + backend.description() + ")");
}

template std::unique_ptr<GaloreKernels<float>> make_galore_kernels(Backend<float>&, Index, Index);
template std::unique_ptr<GaloreKernels<double>> make_galore_kernels(Backend<double>&, Index, Index);

}  // namespace relora
