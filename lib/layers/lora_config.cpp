#include "relora/layers/lora_config.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "relora/core/errors.hpp"

namespace relora {

void validate(const LoraConfig& c) {
  const std::string layer = "LoraLinear " + std::to_string(c.in_features) + " -> " + std::to_string(c.out_features);
  if (c.in_features <= 0 || c.out_features <= 0) {
    throw ConfigError(layer + ": in_features and out_features must be positive");
  }
  const Index max_rank = std::min(c.in_features, c.out_features);
  if (c.rank < 1 || c.rank > max_rank) {
    throw ConfigError(layer + ": rank " + std::to_string(c.rank) + " must be in [1, min(in, out) = " +
                      std::to_string(max_rank) + "]");
  }
  if (!(c.alpha > 0) || !std::isfinite(c.alpha)) {
    throw ConfigError(layer + ": alpha " + std::to_string(c.alpha) + " must be positive and finite");
  }
  if (!(c.dropout >= 0 && c.dropout < 1)) {
    throw ConfigError(layer + ": dropout " + std::to_string(c.dropout) + " must be in [0, 1)");
  }
  if (c.init == LoraInit::gaussian && !(c.init_std > 0 && std::isfinite(c.init_std))) {
    throw ConfigError(layer + ": gaussian init_std " + std::to_string(c.init_std) + " must be positive and finite");
  }
}

double lora_scale(const LoraConfig& c) {
  return c.rslora ? c.alpha / std::sqrt(double(c.rank)) : c.alpha / double(c.rank);
}

}  // namespace relora
