#include "relora/training/trainer.hpp"

namespace relora {

template <typename T>
Trainer<T>::Trainer(Model<T>& model, const TrainerConfig& config, std::shared_ptr<Schedule> schedule,
                    std::shared_ptr<Loss<T>> loss, std::shared_ptr<Communicator<T>> communicator)
    : model_(&model),
      config_(config),
      schedule_(std::move(schedule)),
      optimizer_factory_(config.optimizer ? config.optimizer : optimizer_factory<Adam>(config.adam)),
      loss_(std::move(loss)) {
  if (!loss_) loss_ = std::make_shared<MseLoss<T>>(model.backend());
  if (communicator) buckets_ = std::make_unique<GradientBuckets<T>>(model, *loss_, std::move(communicator));
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
  ++optimizer_generation_;  // a recorded step names the old optimizer's moments: record anew
  std::vector<Parameter<T>> params;
  if (buckets_) {
    // The optimizer reads the gradients summed over the ranks, in the buckets; the old optimizer
    // points into the buckets bind() replaces, so it goes first.
    optimizer_.reset();
    params = buckets_->bind();
  } else {
    params = model_->parameters();
  }
  std::vector<ParamGroup<T>> groups;
  if (config_.lora_plus_ratio != 1) {
    groups = lora_plus_groups(params, optimizer_factory_->lr(), config_.lora_plus_ratio);
  } else {
    groups.push_back(ParamGroup<T>{"all", std::move(params), -1, -1});
  }
  optimizer_ = optimizer_factory_->make(model_->backend_ptr(), std::move(groups));
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
  if (buckets_) buckets_->set_local_rows(X.rows());
  run_step(X, target, schedule_ ? schedule_->factor(steps_done_) : 1.0);
  ++steps_done_;
  if (controller_ && controller_->restart_due(steps_done_)) {
    controller_->restart(*model_, *optimizer_, schedule_.get(), steps_done_);
  }
}

template <typename T>
void Trainer<T>::compute(const Tensor<T>& X, const Tensor<T>& target, double lr_factor) {
  model_->forward_with_loss(X, *loss_, target);
  // Data-parallel: each layer's gradients are summed over the ranks as its backward ends.
  model_->backward(*loss_, buckets_.get());
  if (buckets_) buckets_->wait();
  optimizer_->step(lr_factor);
}

template <typename T>
T Trainer<T>::loss() {
  return buckets_ ? buckets_->loss() : loss_->value();
}

template <typename T>
bool Trainer<T>::describe_step(const Tensor<T>& X, const Tensor<T>& target) {
  StepShape& s = shape_now_;
  s.X = X.data();
  s.x_rows = X.rows();
  s.x_cols = X.cols();
  s.target = target.data();
  s.target_rows = target.rows();
  s.target_cols = target.cols();
  s.optimizer = optimizer_generation_;
  s.layers.resize(model_->size());
  bool recordable = true;
  for (std::size_t i = 0; i < model_->size(); ++i) {
    const Layer<T>& layer = model_->layer(i);
    recordable = recordable && layer.replayable();
    s.layers[i] = layer.step_signature();
  }
  return recordable;
}

// The step, three ways. A replay launches the recorded step once, after `refresh` has handed the
// optimizer's step (this step's learning-rate factor, the update counts, the NaN guard's
// bookkeeping) to the backend. A step is recorded when the last one ran eagerly on the same
// tensors and state, so the per-batch buffers were sized by it and do not move; recording it
// then also runs it. Anything else runs eagerly. ReLoRA's restarts run eagerly between replays:
// they change values (W, A, B, the moments) in place, never buffers, so the recording stays valid.
template <typename T>
void Trainer<T>::run_step(const Tensor<T>& X, const Tensor<T>& target, double lr_factor) {
  Backend<T>& backend = model_->backend();
  if (!config_.use_graphs || failed_recordings_ >= 3 || !describe_step(X, target)) {
    eager_valid_ = false;
    compute(X, target, lr_factor);
    return;
  }
  if (recording_id_ != 0 && shape_now_ == recorded_shape_) {
    if (backend.replay(recording_id_, [&] { optimizer_->step(lr_factor); })) {
      ++replayed_steps_;
      return;
    }
    // Stale (a tensor was allocated since; buffers may have moved) or replaced: run this step
    // eagerly, so that it sizes the buffers, and record the next.
    recording_id_ = 0;
    eager_valid_ = false;
  } else if (eager_valid_ && shape_now_ == eager_shape_ && backend.begin_recording()) {
    const std::int64_t steps_taken = optimizer_->steps_taken();
    std::uint64_t id = 0;
    try {
      compute(X, target, lr_factor);
      id = backend.end_recording();
    } catch (...) {
      backend.drop_recording();
      recording_id_ = 0;
      throw;
    }
    if (id != 0) {
      recording_id_ = id;
      recorded_shape_ = shape_now_;
      failed_recordings_ = 0;
      ++recorded_steps_;
      return;
    }
    // Discarded, nothing of it ran: run it eagerly (the optimizer's count advanced once already).
    optimizer_->set_steps_taken(steps_taken);
    recording_id_ = 0;
    ++failed_recordings_;
  }
  compute(X, target, lr_factor);
  eager_shape_ = shape_now_;
  eager_valid_ = true;
}

template class Trainer<float>;
template class Trainer<double>;

}  // namespace relora
