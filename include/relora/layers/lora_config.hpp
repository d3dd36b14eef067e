#pragma once
// Configuration of one LoRA-adapted linear layer (Hu et al. 2021), with rsLoRA scaling
// (Kalajdzievski 2023). Defaults follow PEFT's LoraConfig where PEFT has one.
#include <cstdint>

#include "relora/core/half_precision.hpp"
#include "relora/core/tensor.hpp"

namespace relora {

enum class LoraInit {
  kaiming_uniform,  // U(-1/sqrt(k), 1/sqrt(k)): Kaiming uniform with a = sqrt(5), as PEFT and nn.Linear
  gaussian,         // N(0, init_std^2)
};

enum class BiasMode { none, frozen, trainable };

// How a merge (W += s B A at a ReLoRA restart) lands in a base stored in bf16 or fp16, where
// round-to-nearest loses every update smaller than half a unit in the last place of W.
enum class BaseMerge {
  stochastic,   // W rounded stochastically (unbiased; reproducible from the layer's seed)
  fp32_master,  // an fp32 copy of W takes the merge exactly and W is rounded from it (4 more bytes per weight)
  nearest,      // W rounded to nearest: small updates are lost (for comparison)
};

struct LoraConfig {
  Index in_features = 0;   // k
  Index out_features = 0;  // d
  Index rank = 8;          // r, 1 <= r <= min(k, d)
  double alpha = 8;        // scale s = alpha / r, or alpha / sqrt(r) with rslora
  bool rslora = false;
  double dropout = 0;      // inverted dropout on the LoRA branch's input, in [0, 1)
  LoraInit init = LoraInit::kaiming_uniform;
  double init_std = 0.02;  // for LoraInit::gaussian
  BiasMode bias = BiasMode::none;
  std::uint64_t seed = 0;  // seeds A's draws and the dropout masks of this layer
  // The frozen base W (and a frozen bias) stored in fp32, bf16 or fp16. A, B, their gradients
  // and a trainable bias stay fp32; X W^T and dY W accumulate in fp32. Low precision needs a
  // float layer (LoraLinear<float>).
  BasePrecision base_precision = BasePrecision::fp32;
  BaseMerge base_merge = BaseMerge::stochastic;  // for a bf16 or fp16 base
};

inline const char* base_merge_name(BaseMerge m) {
  switch (m) {
    case BaseMerge::stochastic: return "stochastic";
    case BaseMerge::fp32_master: return "fp32_master";
    case BaseMerge::nearest: return "nearest";
  }
  return "?";
}

// Throws ConfigError naming the bad value and the layer's shape.
void validate(const LoraConfig& config);

// s = alpha / r, or alpha / sqrt(r) with rsLoRA.
double lora_scale(const LoraConfig& config);

}  // namespace relora
