#include "relora/training/relora_controller.hpp"

namespace relora {

void validate(const ReloraConfig& c) {
  if (c.restart_every < 1) {
    throw ConfigError("ReloraConfig: restart_every " + std::to_string(c.restart_every) + " must be >= 1");
  }
  if (!(c.prune_fraction >= 0 && c.prune_fraction <= 1)) {
    throw ConfigError("ReloraConfig: prune_fraction " + std::to_string(c.prune_fraction) + " must be in [0, 1]");
  }
  if (c.restart_warmup_steps < 0 || c.restart_warmup_steps > c.restart_every) {
    throw ConfigError("ReloraConfig: restart_warmup_steps " + std::to_string(c.restart_warmup_steps) +
                      " must be in [0, restart_every = " + std::to_string(c.restart_every) + "]");
  }
  if (c.warm_start_steps < 0) {
    throw ConfigError("ReloraConfig: warm_start_steps " + std::to_string(c.warm_start_steps) + " must be >= 0");
  }
}

JaggedCosineScheduleConfig jagged_schedule(const ReloraConfig& relora, std::int64_t total_steps,
                                           std::int64_t warmup_steps, double min_lr_ratio) {
  validate(relora);
  JaggedCosineScheduleConfig config;
  config.warmup_steps = warmup_steps;
  config.total_steps = total_steps;
  config.min_lr_ratio = min_lr_ratio;
  config.restart_warmup_steps = relora.restart_warmup_steps;
  return config;
}

template <typename T>
ReloraController<T>::ReloraController(const ReloraConfig& config) : config_(config) {
  validate(config_);
}

template <typename T>
bool ReloraController<T>::restart_due(std::int64_t steps_done) const {
  const std::int64_t lora_steps = steps_done - config_.warm_start_steps;
  return lora_steps > 0 && lora_steps % config_.restart_every == 0;
}

template <typename T>
void ReloraController<T>::restart(Model<T>& model, Optimizer<T>& optimizer, Schedule* schedule, std::int64_t steps_done) {
  // Every merge is checked before any layer changes: a refused one leaves the whole model as it was.
  for (std::size_t i = 0; i < model.size(); ++i) model.layer(i).check_merge();
  for (std::size_t i = 0; i < model.size(); ++i) {
    Layer<T>& layer = model.layer(i);
    layer.merge();   // the adapter into W (LoRA: W += s B A)
    layer.reinit();  // a fresh adapter (A drawn, B = 0): the output is unchanged
  }
  // The adapter's state: A and B, and DoRA's magnitude m, which keeps its value through the
  // restart but whose moments follow the same reset mode as the rest of the adapter's.
  const auto adapter = [](const Parameter<T>& p) {
    return is_adapter_role(p.role);
  };
  switch (config_.reset) {
    case OptimizerReset::full: optimizer.reset_state(adapter); break;
    case OptimizerReset::magnitude_prune:
      optimizer.prune_state(adapter, config_.prune_fraction, PruneMode::magnitude);
      break;
    case OptimizerReset::random_prune:
      optimizer.prune_state(adapter, config_.prune_fraction, PruneMode::random, config_.seed);
      break;
    case OptimizerReset::none: break;
  }
  if (schedule != nullptr) schedule->on_restart(steps_done);
  ++restarts_;
}

template <typename T>
void ReloraController<T>::save_state(StateDict<T>& state) const {
  state.set("restarts_done", std::int64_t(restarts_));
  state.set("restart_every", std::int64_t(config_.restart_every));
  state.set("warm_start_steps", std::int64_t(config_.warm_start_steps));
}

template <typename T>
void ReloraController<T>::check_state(const StateDict<T>& state, std::int64_t steps_done) const {
  const auto same = [&](const char* field, std::int64_t mine) {
    const std::int64_t saved = state.integer(field);
    if (saved != mine) {
      throw IoError(std::string("ReLoRA config field '") + field + "' is " + std::to_string(saved) +
                    " in the checkpoint but " + std::to_string(mine) + " in the trainer");
    }
  };
  same("restart_every", config_.restart_every);
  same("warm_start_steps", config_.warm_start_steps);
  const std::int64_t restarts = state.integer("restarts_done", 0);
  if (restarts > steps_done) {
    throw IoError("state.controller.restarts_done " + std::to_string(restarts) + " exceeds steps_done " +
                  std::to_string(steps_done));
  }
}

template <typename T>
void ReloraController<T>::restore_state(const StateDict<T>& state, std::int64_t steps_done) {
  check_state(state, steps_done);
  restarts_ = state.integer("restarts_done", 0);
}

template class ReloraController<float>;
template class ReloraController<double>;

}  // namespace relora
