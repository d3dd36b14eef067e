#include "relora/optimizers/adam.hpp"

#include <cmath>
#include <set>

#include "optimizers/adam_hyperparameters.hpp"
#include "optimizers/adam_kernels.hpp"
#include "relora/core/host_matrix.hpp"

namespace relora {
namespace {

void validate(const AdamConfig& c) {
  check_adam_hyperparameters("Adam", c.lr, c.beta1, c.beta2, c.eps, c.weight_decay);
}

std::string tensor_name(const std::string& param, const char* what) { return param + "." + what; }

}  // namespace

template <typename T>
Adam<T>::Adam(std::shared_ptr<Backend<T>> backend, std::vector<Parameter<T>> params, const AdamConfig& config)
    : Adam(std::move(backend), std::vector<ParamGroup<T>>{ParamGroup<T>{"all", std::move(params), -1, -1}}, config) {}

template <typename T>
Adam<T>::Adam(std::shared_ptr<Backend<T>> backend, std::vector<ParamGroup<T>> groups, const AdamConfig& config)
    : backend_(std::move(backend)), config_(config), groups_(std::move(groups)) {
  if (!backend_) throw ConfigError("Adam: no backend given");
  validate(config_);
  std::set<const Tensor<T>*> seen;
  std::set<std::string> names;
  for (const ParamGroup<T>& group : groups_) {
    const double lr = group.lr < 0 ? config_.lr : group.lr;
    const double wd = group.weight_decay < 0 ? config_.weight_decay : group.weight_decay;
    if (!std::isfinite(lr)) throw ConfigError("Adam: group '" + group.name + "' has lr " + std::to_string(lr));
    for (const Parameter<T>& p : group.params) {
      check_optimizer_parameter("Adam", p, seen, names);
      State state{&p, lr, wd, backend_->allocate(p.value->rows(), p.value->cols()),
                  backend_->allocate(p.value->rows(), p.value->cols()), backend_->allocate(1, 1)};
      backend_->fill(state.m, T(0));
      backend_->fill(state.v, T(0));
      backend_->fill(state.step, T(0));
      states_.push_back(std::move(state));
    }
  }
  std::vector<AdamSlot<T>> slots;
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
    slots.push_back(slot);
  }
  // The slots' pointers stay valid: tensors never move their data, and groups_ is not resized.
  kernels_ = make_adam_kernels(*backend_, std::move(slots));
}

template <typename T>
Adam<T>::~Adam() = default;

template <typename T>
void Adam<T>::step(double lr_factor) {
  if (!std::isfinite(lr_factor) || lr_factor < 0) {
    throw ConfigError("Adam step: lr_factor " + std::to_string(lr_factor) + " must be finite and >= 0");
  }
  kernels_->update(adam_hyper(config_, lr_factor));
  ++steps_taken_;
}

template <typename T>
void Adam<T>::reset_state(const ParameterSelector<T>& which) {
  for (State& s : states_) {
    if (!which(*s.param)) continue;
    backend_->fill(s.m, T(0));
    backend_->fill(s.v, T(0));
    backend_->fill(s.step, T(0));
  }
}

template <typename T>
void Adam<T>::prune_state(const ParameterSelector<T>& which, double fraction, PruneMode mode, std::uint64_t seed) {
  if (!(fraction >= 0 && fraction <= 1)) {
    throw ConfigError("Adam prune_state: fraction " + std::to_string(fraction) + " must be in [0, 1]");
  }
  for (State& s : states_) {
    if (!which(*s.param)) continue;
    // One mask for both moments, chosen by m: separate masks leave entries with m != 0 over v = 0,
    // whose next update divides an old momentum by a fresh, tiny v (that diverged in our tests).
    kernels_->prune(mode, fraction, RngKey{seed, prune_draws_++}, s.m, s.v);
  }
}

template <typename T>
void Adam<T>::save_state(StateDict<T>& state) const {
  for (const State& s : states_) {
    const std::string& name = s.param->name;
    state.set_tensor(tensor_name(name, "m"), to_host(*backend_, s.m));
    state.set_tensor(tensor_name(name, "v"), to_host(*backend_, s.v));
    state.set_tensor(tensor_name(name, "step"), to_host(*backend_, s.step));
  }
  state.set("steps_taken", std::int64_t(steps_taken_));
  state.set("prune_draws", std::uint64_t(prune_draws_));
}

template <typename T>
void Adam<T>::check_state(const StateDict<T>& state) const {
  const std::int64_t steps = state.integer("steps_taken", 0);
  state.unsigned_integer("prune_draws");
  std::set<std::string> expected;
  for (const State& s : states_) {
    const std::string& name = s.param->name;
    const Index rows = s.param->value->rows(), cols = s.param->value->cols();
    state.tensor(tensor_name(name, "m"), rows, cols);
    if ((state.tensor(tensor_name(name, "v"), rows, cols).array() < T(0)).any()) {
      throw IoError("state: tensor '" + state.where(tensor_name(name, "v")) + "' holds a negative second moment");
    }
    const T count = state.tensor(tensor_name(name, "step"), 1, 1)(0, 0);
    if (count < T(0) || std::floor(count) != count || double(count) > double(steps)) {
      throw IoError("state: tensor '" + state.where(tensor_name(name, "step")) + "' holds update count " +
                    std::to_string(double(count)) + ", not a whole number in [0, steps_taken = " +
                    std::to_string(steps) + "]");
    }
    for (const char* what : {"m", "v", "step"}) expected.insert(tensor_name(name, what));
  }
  for (const auto& entry : state.tensors()) {
    if (expected.count(entry.first) == 0) {
      throw IoError("state: tensor '" + state.where(entry.first) + "' belongs to no parameter of this optimizer");
    }
  }
}

template <typename T>
void Adam<T>::restore_state(const StateDict<T>& state) {
  check_state(state);
  for (State& s : states_) {
    const std::string& name = s.param->name;
    const Index rows = s.param->value->rows(), cols = s.param->value->cols();
    upload<T>(*backend_, state.tensor(tensor_name(name, "m"), rows, cols), s.m, "Adam m of " + name);
    upload<T>(*backend_, state.tensor(tensor_name(name, "v"), rows, cols), s.v, "Adam v of " + name);
    upload<T>(*backend_, state.tensor(tensor_name(name, "step"), 1, 1), s.step, "Adam update count of " + name);
  }
  steps_taken_ = state.integer("steps_taken", 0);
  prune_draws_ = state.unsigned_integer("prune_draws");
}

template class Adam<float>;
template class Adam<double>;

}  // namespace relora
