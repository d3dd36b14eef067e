#include "relora/optimizers/adam.hpp"

#include <cmath>
#include <set>

namespace relora {
namespace {

void validate(const AdamConfig& c) {
  auto check = [](bool ok, const std::string& what) {
    if (!ok) throw ConfigError("Adam: " + what);
  };
  check(std::isfinite(c.lr) && c.lr >= 0, "lr " + std::to_string(c.lr) + " must be finite and >= 0");
  check(c.beta1 >= 0 && c.beta1 < 1, "beta1 " + std::to_string(c.beta1) + " must be in [0, 1)");
  check(c.beta2 >= 0 && c.beta2 < 1, "beta2 " + std::to_string(c.beta2) + " must be in [0, 1)");
  check(std::isfinite(c.eps) && c.eps > 0, "eps " + std::to_string(c.eps) + " must be > 0");
  check(std::isfinite(c.weight_decay) && c.weight_decay >= 0,
        "weight_decay " + std::to_string(c.weight_decay) + " must be >= 0");
}

}  // namespace

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

template <typename T>
Adam<T>::Adam(std::shared_ptr<Backend<T>> backend, std::vector<Parameter<T>> params, const AdamConfig& config)
    : Adam(std::move(backend), std::vector<ParamGroup<T>>{ParamGroup<T>{"all", std::move(params), -1, -1}}, config) {}

template <typename T>
Adam<T>::Adam(std::shared_ptr<Backend<T>> backend, std::vector<ParamGroup<T>> groups, const AdamConfig& config)
    : backend_(std::move(backend)), config_(config), groups_(std::move(groups)) {
  if (!backend_) throw ConfigError("Adam: no backend given");
  validate(config_);
  std::set<const Tensor<T>*> seen;
  for (const ParamGroup<T>& group : groups_) {
    const double lr = group.lr < 0 ? config_.lr : group.lr;
    const double wd = group.weight_decay < 0 ? config_.weight_decay : group.weight_decay;
    if (!std::isfinite(lr)) throw ConfigError("Adam: group '" + group.name + "' has lr " + std::to_string(lr));
    for (const Parameter<T>& p : group.params) {
      if (p.value == nullptr || p.grad == nullptr) {
        throw ConfigError("Adam: parameter '" + p.name + "' has no value or no gradient tensor");
      }
      if (!p.grad->same_shape(p.value->rows(), p.value->cols())) {
        throw ShapeError("Adam: parameter '" + p.name + "' is " + p.value->shape() + " but its gradient is " +
                         p.grad->shape());
      }
      if (!seen.insert(p.value).second) {
        throw ConfigError("Adam: parameter '" + p.name + "' appears in more than one group");
      }
      State state{&p, lr, wd, backend_->allocate(p.value->rows(), p.value->cols()),
                  backend_->allocate(p.value->rows(), p.value->cols()), backend_->allocate(1, 1)};
      backend_->fill(state.m, T(0));
      backend_->fill(state.v, T(0));
      backend_->fill(state.step, T(0));
      states_.push_back(std::move(state));
    }
  }
  for (State& s : states_) {
    AdamSlot<T> slot;
    slot.param = s.param->value->data();
    slot.grad = s.param->grad->data();
    slot.m = s.m.data();
    slot.v = s.v.data();
    slot.step = s.step.data();
    slot.size = s.param->value->size();
    slot.lr = s.lr;
    slot.weight_decay = s.weight_decay;
    slot.name = s.param->name.c_str();
    slots_.push_back(slot);
  }
}

template <typename T>
void Adam<T>::step(double lr_factor) {
  if (!std::isfinite(lr_factor) || lr_factor < 0) {
    throw ConfigError("Adam step: lr_factor " + std::to_string(lr_factor) + " must be finite and >= 0");
  }
  AdamHyper hyper;
  hyper.lr_factor = lr_factor;
  hyper.beta1 = config_.beta1;
  hyper.beta2 = config_.beta2;
  hyper.eps = config_.eps;
  hyper.decoupled_weight_decay = config_.decoupled_weight_decay;
  backend_->adam_update(slots_.data(), slots_.size(), hyper);
  ++steps_taken_;
}

template <typename T>
void Adam<T>::reset_moments(const std::function<bool(const Parameter<T>&)>& which) {
  for (State& s : states_) {
    if (!which(*s.param)) continue;
    backend_->fill(s.m, T(0));
    backend_->fill(s.v, T(0));
    backend_->fill(s.step, T(0));
  }
}

template <typename T>
void Adam<T>::prune_moments(const std::function<bool(const Parameter<T>&)>& which, double fraction, PruneMode mode,
                            std::uint64_t seed) {
  if (!(fraction >= 0 && fraction <= 1)) {
    throw ConfigError("Adam prune_moments: fraction " + std::to_string(fraction) + " must be in [0, 1]");
  }
  for (State& s : states_) {
    if (!which(*s.param)) continue;
    // One mask for both moments, chosen by m: separate masks leave entries with m != 0 over v = 0,
    // whose next update divides an old momentum by a fresh, tiny v (that diverged in our tests).
    backend_->prune(mode, fraction, RngKey{seed, prune_draws_++}, s.m, &s.v);
  }
}

template std::vector<ParamGroup<float>> lora_plus_groups(const std::vector<Parameter<float>>&, double, double);
template std::vector<ParamGroup<double>> lora_plus_groups(const std::vector<Parameter<double>>&, double, double);
template class Adam<float>;
template class Adam<double>;

}  // namespace relora
