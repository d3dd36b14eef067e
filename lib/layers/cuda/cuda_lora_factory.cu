// The CUDA part of make_lora_linear: which CUDA sibling suits a layer.
#include "cuda/cuda_context.cuh"
#include "layers/cuda/cuda_lora_linear.hpp"

#include <type_traits>

namespace relora {

template <typename T>
std::unique_ptr<LoraLinear<T>> make_cuda_lora_linear(Backend<T>& backend, const LoraConfig& config,
                                                     const Eigen::Ref<const HostMatrix<T>>* W,
                                                     const Eigen::Ref<const HostVector<T>>* b) {
  auto* cuda = dynamic_cast<cuda_detail::CudaContext*>(&backend.underlying());
  if (cuda == nullptr) return nullptr;
  const auto build = [&](auto* tag) -> std::unique_ptr<LoraLinear<T>> {
    using Layer = std::remove_pointer_t<decltype(tag)>;
    if (W == nullptr) return std::make_unique<Layer>(*cuda, backend, config);
    if (b == nullptr) return std::make_unique<Layer>(*cuda, backend, config, *W);
    return std::make_unique<Layer>(*cuda, backend, config, *W, *b);
  };
  // The tiny layer's kernels read an fp32 W; the adapter layer runs its base products through
  // FrozenBase, so it takes a 16-bit base too.
  if (config.base_precision == BasePrecision::fp32 && CudaTinyLoraLinear<T>::suits(config)) {
    return build(static_cast<CudaTinyLoraLinear<T>*>(nullptr));
  }
  if constexpr (std::is_same<T, float>::value) {
    if (CudaHalfLoraLinear::suits(config)) return build(static_cast<CudaHalfLoraLinear*>(nullptr));
  }
  if (CudaAdapterLoraLinear<T>::suits(config)) return build(static_cast<CudaAdapterLoraLinear<T>*>(nullptr));
  return nullptr;
}

template std::unique_ptr<LoraLinear<float>> make_cuda_lora_linear(Backend<float>&, const LoraConfig&,
                                                                  const Eigen::Ref<const HostMatrix<float>>*,
                                                                  const Eigen::Ref<const HostVector<float>>*);
template std::unique_ptr<LoraLinear<double>> make_cuda_lora_linear(Backend<double>&, const LoraConfig&,
                                                                   const Eigen::Ref<const HostMatrix<double>>*,
                                                                   const Eigen::Ref<const HostVector<double>>*);

}  // namespace relora
