// GaLore's saved state: what save_state writes, check_state verifies and restore_state takes
// over (the list is in include/relora/optimizers/galore.hpp).
#include <cmath>
#include <set>

#include "optimizers/galore_kernels.hpp"
#include "optimizers/galore_projected.hpp"
#include "relora/core/host_matrix.hpp"

namespace relora {

template <typename T>
void Galore<T>::save_state(StateDict<T>& state) const {
  for (std::size_t i = 0; i < dense_params_.size(); ++i) {
    const std::string& name = dense_params_[i]->name;
    state.set_tensor(galore_entry(name, "m"), to_host(*backend_, dense_m_[i]));
    state.set_tensor(galore_entry(name, "v"), to_host(*backend_, dense_v_[i]));
    state.set_tensor(galore_entry(name, "step"), to_host(*backend_, dense_step_[i]));
  }
  for (const auto& x : projected_) {
    const std::string& name = x->param->name;
    state.set_tensor(galore_entry(name, "m"), to_host(*backend_, x->m));
    state.set_tensor(galore_entry(name, "v"), to_host(*backend_, x->v));
    state.set_tensor(galore_entry(name, "step"), to_host(*backend_, x->step));
    state.set(galore_entry(name, "refreshed_at"), std::int64_t(x->refreshed_at));
    if (x->refreshed_at < 0) continue;
    if (x->uses_p) state.set_tensor(galore_entry(name, "P"), to_host(*backend_, x->P));
    if (x->uses_q) state.set_tensor(galore_entry(name, "Q"), to_host(*backend_, x->Q));
  }
  state.set("steps_taken", std::int64_t(steps_taken_));
  state.set("prune_draws", std::uint64_t(prune_draws_));
  state.set("rank", std::int64_t(config_.rank));
  state.set("projection", std::string(projection_name(config_.projection)));
}

template <typename T>
void Galore<T>::check_state(const StateDict<T>& state) const {
  const std::int64_t steps = state.integer("steps_taken", 0);
  state.unsigned_integer("prune_draws");
  const std::int64_t rank = state.integer("rank", 1);
  if (rank != config_.rank) {
    throw IoError("state: field 'rank' is " + std::to_string(rank) + " but this GaLore has rank " +
                  std::to_string(config_.rank));
  }
  if (state.text("projection") != projection_name(config_.projection)) {
    throw IoError("state: field 'projection' is '" + state.text("projection") + "' but this GaLore is " +
                  projection_name(config_.projection));
  }
  std::set<std::string> expected;
  auto check_moments = [&](const std::string& name, Index rows, Index cols) {
    state.tensor(galore_entry(name, "m"), rows, cols);
    if ((state.tensor(galore_entry(name, "v"), rows, cols).array() < T(0)).any()) {
      throw IoError("state: tensor '" + state.where(galore_entry(name, "v")) + "' holds a negative second moment");
    }
    const T count = state.tensor(galore_entry(name, "step"), 1, 1)(0, 0);
    if (count < T(0) || std::floor(count) != count || double(count) > double(steps)) {
      throw IoError("state: tensor '" + state.where(galore_entry(name, "step")) + "' holds update count " +
                    std::to_string(double(count)) + ", not a whole number in [0, steps_taken = " +
                    std::to_string(steps) + "]");
    }
    for (const char* what : {"m", "v", "step"}) expected.insert(galore_entry(name, what));
  };
  for (std::size_t i = 0; i < dense_params_.size(); ++i) {
    check_moments(dense_params_[i]->name, dense_params_[i]->value->rows(), dense_params_[i]->value->cols());
  }
  for (const auto& x : projected_) {
    const std::string& name = x->param->name;
    check_moments(name, x->m.rows(), x->m.cols());
    const std::int64_t at = state.integer(galore_entry(name, "refreshed_at"), -1, steps);
    if (at < 0) continue;
    if (x->uses_p) {
      state.tensor(galore_entry(name, "P"), x->rows, config_.rank);
      expected.insert(galore_entry(name, "P"));
    }
    if (x->uses_q) {
      state.tensor(galore_entry(name, "Q"), x->cols, config_.rank);
      expected.insert(galore_entry(name, "Q"));
    }
  }
  for (const auto& entry : state.tensors()) {
    if (expected.count(entry.first) == 0) {
      throw IoError("state: tensor '" + state.where(entry.first) + "' belongs to no parameter of this optimizer");
    }
  }
}

template <typename T>
void Galore<T>::restore_state(const StateDict<T>& state) {
  check_state(state);
  for (std::size_t i = 0; i < dense_params_.size(); ++i) {
    const std::string& name = dense_params_[i]->name;
    const Index rows = dense_m_[i].rows(), cols = dense_m_[i].cols();
    upload<T>(*backend_, state.tensor(galore_entry(name, "m"), rows, cols), dense_m_[i], "GaLore m of " + name);
    upload<T>(*backend_, state.tensor(galore_entry(name, "v"), rows, cols), dense_v_[i], "GaLore v of " + name);
    upload<T>(*backend_, state.tensor(galore_entry(name, "step"), 1, 1), dense_step_[i], "GaLore count of " + name);
  }
  for (const auto& x : projected_) {
    const std::string& name = x->param->name;
    const Index rows = x->m.rows(), cols = x->m.cols();
    upload<T>(*backend_, state.tensor(galore_entry(name, "m"), rows, cols), x->m, "GaLore m of " + name);
    upload<T>(*backend_, state.tensor(galore_entry(name, "v"), rows, cols), x->v, "GaLore v of " + name);
    upload<T>(*backend_, state.tensor(galore_entry(name, "step"), 1, 1), x->step, "GaLore count of " + name);
    x->refreshed_at = state.integer(galore_entry(name, "refreshed_at"), -1);
    if (x->refreshed_at < 0) continue;
    if (x->uses_p) upload<T>(*backend_, state.tensor(galore_entry(name, "P"), x->rows, config_.rank), x->P, "GaLore P");
    if (x->uses_q) upload<T>(*backend_, state.tensor(galore_entry(name, "Q"), x->cols, config_.rank), x->Q, "GaLore Q");
  }
  steps_taken_ = state.integer("steps_taken", 0);
  prune_draws_ = state.unsigned_integer("prune_draws");
  make_recordings_stale();
}

template void Galore<float>::save_state(StateDict<float>&) const;
template void Galore<double>::save_state(StateDict<double>&) const;
template void Galore<float>::check_state(const StateDict<float>&) const;
template void Galore<double>::check_state(const StateDict<double>&) const;
template void Galore<float>::restore_state(const StateDict<float>&);
template void Galore<double>::restore_state(const StateDict<double>&);

}  // namespace relora
