#pragma once
// The checks that every optimizer built on Adam's moments makes (Adam itself, GaLore) of its
// settings and of each parameter it is given, with the optimizer's name in the message.
#include <cmath>
#include <set>
#include <string>

#include "relora/core/errors.hpp"
#include "relora/core/parameter.hpp"

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

// A parameter has a value and a gradient of its shape, belongs to one group only, and has a name
// no other parameter has (the saved state is keyed by it). seen and names collect the parameters
// checked so far.
template <typename T>
void check_optimizer_parameter(const std::string& optimizer, const Parameter<T>& p, std::set<const Tensor<T>*>& seen,
                               std::set<std::string>& names) {
  if (p.value == nullptr || p.grad == nullptr) {
    throw ConfigError(optimizer + ": parameter '" + p.name + "' has no value or no gradient tensor");
  }
  if (!p.grad->same_shape(p.value->rows(), p.value->cols())) {
    throw ShapeError(optimizer + ": parameter '" + p.name + "' is " + p.value->shape() + " but its gradient is " +
                     p.grad->shape());
  }
  if (!seen.insert(p.value).second) {
    throw ConfigError(optimizer + ": parameter '" + p.name + "' appears in more than one group");
  }
  if (!names.insert(p.name).second) {
    throw ConfigError(optimizer + ": two parameters are named '" + p.name + "' (the saved state names them apart)");
  }
}

}  // namespace relora
