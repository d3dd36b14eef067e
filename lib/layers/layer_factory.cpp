#include "relora/layers/layer_factory.hpp"

#include "layers/cpu/cpu_tiny_lora_linear.hpp"
#if defined(RELORA_WITH_CUDA)
#include "layers/cuda/cuda_lora_linear.hpp"
#endif

namespace relora {
namespace {

template <typename T>
std::unique_ptr<LoraLinear<T>> make(Backend<T>& backend, const LoraConfig& config,
                                    const Eigen::Ref<const HostMatrix<T>>* W, const Eigen::Ref<const HostVector<T>>* b,
                                    LayerChoice choice) {
  validate(config);
  if (choice == LayerChoice::fastest) {
    // The CPU tiny layer's kernels read an fp32 W; a 16-bit base there runs LoraLinear's products.
    const bool fp32_base = config.base_precision == BasePrecision::fp32;
    if (backend.device() == Device::cpu && fp32_base && CpuTinyLoraLinear<T>::suits(config)) {
      if (W == nullptr) return std::make_unique<CpuTinyLoraLinear<T>>(backend, config);
      if (b == nullptr) return std::make_unique<CpuTinyLoraLinear<T>>(backend, config, *W);
      return std::make_unique<CpuTinyLoraLinear<T>>(backend, config, *W, *b);
    }
#if defined(RELORA_WITH_CUDA)
    if (backend.device() == Device::cuda) {
      if (auto layer = make_cuda_lora_linear<T>(backend, config, W, b)) return layer;
    }
#endif
  }
  if (W == nullptr) return std::make_unique<LoraLinear<T>>(backend, config);
  if (b == nullptr) return std::make_unique<LoraLinear<T>>(backend, config, *W);
  return std::make_unique<LoraLinear<T>>(backend, config, *W, *b);
}

}  // namespace

template <typename T>
std::unique_ptr<LoraLinear<T>> make_lora_linear(Backend<T>& backend, const LoraConfig& config, LayerChoice choice) {
  return make<T>(backend, config, nullptr, nullptr, choice);
}

template <typename T>
std::unique_ptr<LoraLinear<T>> make_lora_linear(Backend<T>& backend, const LoraConfig& config,
                                                const Eigen::Ref<const HostMatrix<T>>& W, LayerChoice choice) {
  return make<T>(backend, config, &W, nullptr, choice);
}

template <typename T>
std::unique_ptr<LoraLinear<T>> make_lora_linear(Backend<T>& backend, const LoraConfig& config,
                                                const Eigen::Ref<const HostMatrix<T>>& W,
                                                const Eigen::Ref<const HostVector<T>>& b, LayerChoice choice) {
  return make<T>(backend, config, &W, &b, choice);
}

#define RELORA_INSTANTIATE(T)                                                                                      \
  template std::unique_ptr<LoraLinear<T>> make_lora_linear(Backend<T>&, const LoraConfig&, LayerChoice);           \
  template std::unique_ptr<LoraLinear<T>> make_lora_linear(Backend<T>&, const LoraConfig&,                         \
                                                           const Eigen::Ref<const HostMatrix<T>>&, LayerChoice);   \
  template std::unique_ptr<LoraLinear<T>> make_lora_linear(Backend<T>&, const LoraConfig&,                         \
                                                           const Eigen::Ref<const HostMatrix<T>>&,                 \
                                                           const Eigen::Ref<const HostVector<T>>&, LayerChoice);
RELORA_INSTANTIATE(float)
RELORA_INSTANTIATE(double)
#undef RELORA_INSTANTIATE

}  // namespace relora
