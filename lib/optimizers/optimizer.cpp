#include "relora/optimizers/optimizer.hpp"

#include <cmath>

namespace relora {

template <typename T>
std::vector<ParamGroup<T>> lora_plus_groups(const std::vector<Parameter<T>>& params, double lr, double ratio) {
  if (!(ratio > 0) || !std::isfinite(ratio)) {
    throw ConfigError("lora_plus_groups: ratio " + std::to_string(ratio) + " must be positive");
  }
  ParamGroup<T> rest{"lora_A and others", {}, lr, -1};
  ParamGroup<T> b_group{"lora_B", {}, lr * ratio, -1};
  for (const Parameter<T>& p : params) (p.role == ParamRole::lora_B ? b_group : rest).params.push_back(p);
  return {rest, b_group};
}

template std::vector<ParamGroup<float>> lora_plus_groups(const std::vector<Parameter<float>>&, double, double);
template std::vector<ParamGroup<double>> lora_plus_groups(const std::vector<Parameter<double>>&, double, double);

}  // namespace relora
