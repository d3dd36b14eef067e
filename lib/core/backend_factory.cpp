#include <memory>

#include "cpu/cpu_backend.hpp"
#include "relora/core/backend.hpp"

#if defined(RELORA_WITH_CUDA)
#include "cuda/cuda_backend.hpp"
#endif

namespace relora {

bool cuda_available(std::string* why) {
#if defined(RELORA_WITH_CUDA)
  return cuda_device_available(why);
#else
  if (why) *why = "relora was built without CUDA (no CUDA toolkit was found, or RELORA_CUDA=OFF)";
  return false;
#endif
}

template <typename T>
std::shared_ptr<Backend<T>> make_backend(Device device, const BackendOptions& options) {
  if (device == Device::cpu) {
    return std::make_shared<CpuBackend<T>>(options);
  }
  std::string why;
  if (!cuda_available(&why)) throw DeviceError("cannot make a CUDA backend: " + why);
#if defined(RELORA_WITH_CUDA)
  return make_cuda_backend<T>(options);
#else
  return nullptr;  // unreachable: cuda_available is false without CUDA
#endif
}

template std::shared_ptr<Backend<float>> make_backend<float>(Device, const BackendOptions&);
template std::shared_ptr<Backend<double>> make_backend<double>(Device, const BackendOptions&);

}  // namespace relora
