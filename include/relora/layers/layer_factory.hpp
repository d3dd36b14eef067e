#pragma once
// The one place that picks a layer's implementation: the reference LoraLinear, or the sibling
// that is faster for these widths on this backend (tiny layers on the CPU and CUDA, wide layers
// of small rank on CUDA). Every sibling computes what LoraLinear computes (tests compare them)
// and falls back to LoraLinear's products for what it does not cover.
#include <memory>

#include "relora/layers/lora_linear.hpp"

namespace relora {

enum class LayerChoice {
  fastest,    // a fast sibling where one suits the shapes and the backend
  reference,  // LoraLinear itself (tests, and measuring what the siblings gain)
};

// The layer LoraLinear(backend, config, ...) would be, as its fastest or reference implementation.
template <typename T>
std::unique_ptr<LoraLinear<T>> make_lora_linear(Backend<T>& backend, const LoraConfig& config,
                                                LayerChoice choice = LayerChoice::fastest);
template <typename T>
std::unique_ptr<LoraLinear<T>> make_lora_linear(Backend<T>& backend, const LoraConfig& config,
                                                const Eigen::Ref<const HostMatrix<T>>& W,
                                                LayerChoice choice = LayerChoice::fastest);
template <typename T>
std::unique_ptr<LoraLinear<T>> make_lora_linear(Backend<T>& backend, const LoraConfig& config,
                                                const Eigen::Ref<const HostMatrix<T>>& W,
                                                const Eigen::Ref<const HostVector<T>>& b,
                                                LayerChoice choice = LayerChoice::fastest);

}  // namespace relora
