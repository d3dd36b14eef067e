#pragma once
// A trainable tensor as the optimizer sees it: a value, its gradient, a name and a role. The
// role lets the ReLoRA controller and LoRA+ grouping pick parameters without knowing layers.
#include <string>

#include "relora/core/tensor.hpp"

namespace relora {

// magnitude: DoRA's per-row magnitude m, part of the adapter (reset with it at a ReLoRA restart).
enum class ParamRole { lora_A, lora_B, magnitude, bias, base_weight };

// Whether a role belongs to an adapter (restarted by ReLoRA) rather than to the base layer: every
// role but the base weight and the bias, so that a new kind of adapter's roles count without a
// change to the controller.
inline bool is_adapter_role(ParamRole role) { return role != ParamRole::base_weight && role != ParamRole::bias; }

template <typename T>
struct Parameter {
  std::string name;  // e.g. "layers.0.lora_A"
  ParamRole role = ParamRole::lora_A;
  Tensor<T>* value = nullptr;
  const Tensor<T>* grad = nullptr;
};

}  // namespace relora
