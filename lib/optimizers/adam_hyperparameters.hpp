#pragma once
// The checks of Adam's settings that every optimizer built on Adam's moments makes (Adam itself,
// GaLore), with the optimizer's name in the message.
#include <cmath>
#include <string>

#include "relora/core/errors.hpp"

namespace relora {

inline void check_adam_hyperparameters(const std::string& optimizer, double lr, double beta1, double beta2,
                                       double eps, double weight_decay) {
  auto check = [&](bool ok, const std::string& what) {
    if (!ok) throw ConfigError(optimizer + ": " + what);
  };
  check(std::isfinite(lr) && lr >= 0, "lr " + std::to_string(lr) + " must be finite and >= 0");
  check(beta1 >= 0 && beta1 < 1, "beta1 " + std::to_string(beta1) + " must be in [0, 1)");
  check(beta2 >= 0 && beta2 < 1, "beta2 " + std::to_string(beta2) + " must be in [0, 1)");
  check(std::isfinite(eps) && eps > 0, "eps " + std::to_string(eps) + " must be > 0");
  check(std::isfinite(weight_decay) && weight_decay >= 0,
        "weight_decay " + std::to_string(weight_decay) + " must be >= 0");
}

}  // namespace relora
