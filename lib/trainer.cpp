#include "relora/trainer.hpp"

namespace relora {

template <typename T>
Trainer<T>::Trainer(Model<T>& model, const TrainerConfig& config, std::shared_ptr<Schedule> schedule)
    : model_(&model), config_(config), schedule_(std::move(schedule)), loss_(model.backend()) {
  if (config_.method == TrainingMethod::relora) {
    controller_ = std::make_unique<ReloraController<T>>(config_.relora);
    if (auto* jagged = dynamic_cast<JaggedCosineSchedule*>(schedule_.get());
        jagged && jagged->config().restart_warmup_steps > config_.relora.restart_every) {
      throw ConfigError("Trainer: the schedule's restart_warmup_steps " +
                        std::to_string(jagged->config().restart_warmup_steps) + " exceed restart_every " +
                        std::to_string(config_.relora.restart_every));
    }
  }
  set_steps_done(0);
}

template <typename T>
TrainTarget Trainer<T>::target_at(std::int64_t step) const {
  if (config_.method == TrainingMethod::full_finetune) return TrainTarget::base;
  if (controller_ && controller_->in_warm_start(step)) return TrainTarget::base;
  return TrainTarget::adapter;
}

template <typename T>
void Trainer<T>::build_optimizer() {
  const std::vector<Parameter<T>> params = model_->parameters();
  if (config_.lora_plus_ratio != 1) {
    optimizer_ = std::make_unique<Adam<T>>(model_->backend_ptr(),
                                           lora_plus_groups(params, config_.adam.lr, config_.lora_plus_ratio),
                                           config_.adam);
  } else {
    optimizer_ = std::make_unique<Adam<T>>(model_->backend_ptr(), params, config_.adam);
  }
}

template <typename T>
void Trainer<T>::set_steps_done(std::int64_t steps) {
  if (steps < 0) throw ConfigError("Trainer: steps_done " + std::to_string(steps) + " must be >= 0");
  steps_done_ = steps;
  model_->set_train_target(target_at(steps));
  build_optimizer();
}

template <typename T>
void Trainer<T>::step(const Tensor<T>& X, const Tensor<T>& target) {
  if (target_at(steps_done_) != model_->layer(0).train_target()) {
    // ReLoRA's warm start is over: the adapters train from here, with a fresh optimizer.
    model_->set_train_target(target_at(steps_done_));
    build_optimizer();
  }
  const Tensor<T>& dY = loss_.forward_backward(model_->forward(X), target);
  model_->backward(dY);
  optimizer_->step(schedule_ ? schedule_->factor(steps_done_) : 1.0);
  ++steps_done_;
  if (controller_ && controller_->restart_due(steps_done_)) {
    controller_->restart(*model_, *optimizer_, schedule_.get(), steps_done_);
  }
}

template class Trainer<float>;
template class Trainer<double>;

}  // namespace relora
