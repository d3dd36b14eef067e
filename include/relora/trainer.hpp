#pragma once
// The training loop's one step, put together: forward, MSE, backward, Adam with the schedule's
// factor, and ReLoRA's restart when it is due. It owns the optimizer because ReLoRA's warm start
// changes what trains (W first, then the adapters) and so needs a fresh one.
#include <cstdint>
#include <memory>

#include "relora/adam.hpp"
#include "relora/model.hpp"
#include "relora/mse_loss.hpp"
#include "relora/relora_controller.hpp"
#include "relora/schedule.hpp"

namespace relora {

enum class TrainingMethod {
  lora,           // adapters train, never merged
  relora,         // adapters train, merged and restarted every ReloraConfig::restart_every steps
  full_finetune,  // W itself trains (no adapter), the reference a low-rank method is measured against
};

struct TrainerConfig {
  TrainingMethod method = TrainingMethod::lora;
  AdamConfig adam;
  double lora_plus_ratio = 1;  // B's learning rate over A's (LoRA+, Hayou et al. 2024, suggests 16)
  ReloraConfig relora;         // for TrainingMethod::relora
};

template <typename T>
class Trainer {
 public:
  // `schedule` may be null (constant learning rate). The model must outlive the trainer.
  Trainer(Model<T>& model, const TrainerConfig& config, std::shared_ptr<Schedule> schedule = nullptr);

  // One training step on a batch already on the model's backend. Nothing in it waits for a GPU.
  void step(const Tensor<T>& X, const Tensor<T>& target);
  // The loss of the last step's batch, before its update; waits for the backend.
  T loss() { return loss_.value(); }

  std::int64_t steps_done() const { return steps_done_; }
  // Resuming: puts the trainer where `steps` steps leave it (what trains, which optimizer).
  void set_steps_done(std::int64_t steps);

  Model<T>& model() { return *model_; }
  Adam<T>& optimizer() { return *optimizer_; }
  MseLoss<T>& loss_function() { return loss_; }
  Schedule* schedule() { return schedule_.get(); }
  ReloraController<T>* controller() { return controller_ ? controller_.get() : nullptr; }
  const TrainerConfig& config() const { return config_; }

 private:
  TrainTarget target_at(std::int64_t step) const;
  void build_optimizer();

  Model<T>* model_;
  TrainerConfig config_;
  std::shared_ptr<Schedule> schedule_;
  std::unique_ptr<ReloraController<T>> controller_;
  std::unique_ptr<Adam<T>> optimizer_;
  MseLoss<T> loss_;
  std::int64_t steps_done_ = 0;
};

extern template class Trainer<float>;
extern template class Trainer<double>;

}  // namespace relora
