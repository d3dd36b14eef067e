#pragma once
// Configuration of one LoRA-adapted linear layer (Hu et al. 2021), with rsLoRA scaling
// (Kalajdzievski 2023). Defaults follow PEFT's LoraConfig where PEFT has one.
#include <cstdint>

#include "relora/core/tensor.hpp"

namespace relora {

enum class LoraInit {
  kaiming_uniform,  // U(-1/sqrt(k), 1/sqrt(k)): Kaiming uniform with a = sqrt(5), as PEFT and nn.Linear
  gaussian,         // N(0, init_std^2)
};

enum class BiasMode { none, frozen, trainable };

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
};

// Throws ConfigError naming the bad value and the layer's shape.
void validate(const LoraConfig& config);

// s = alpha / r, or alpha / sqrt(r) with rsLoRA.
double lora_scale(const LoraConfig& config);

}  // namespace relora
