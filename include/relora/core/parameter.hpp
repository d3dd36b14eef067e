#pragma once
// A trainable tensor as the optimizer sees it: a value, its gradient, a name and a role. The
// role lets the ReLoRA controller and LoRA+ grouping pick parameters without knowing layers.
#include <string>

#include "relora/core/tensor.hpp"

namespace relora {

// magnitude: DoRA's per-row magnitude m, part of the adapter (reset with it at a ReLoRA restart).
enum class ParamRole { lora_A, lora_B, magnitude, bias, base_weight };

template <typename T>
struct Parameter {
  std::string name;  // e.g. "layers.0.lora_A"
  ParamRole role = ParamRole::lora_A;
  Tensor<T>* value = nullptr;
  const Tensor<T>* grad = nullptr;
};

}  // namespace relora
