#pragma once
// The training loop's one step, put together: forward, the loss, backward, the optimizer's step
// with the schedule's factor, and ReLoRA's restart when it is due. It owns the optimizer, built from
// TrainerConfig's factory, because ReLoRA's warm start changes what trains (W first, then the
// adapters) and so needs a fresh one.
//
// Data-parallel training: given a communicator, the trainer is one rank of a group. Every rank
// builds the same model (the same configs and seeds) and trainer, and steps on its own rows of
// each batch; the gradients (and the loss) are summed over the ranks as the backward goes
// (GradientBuckets), so every rank takes the step one process would take on the whole batch, and
// the ranks stay identical to the bit. Checkpoints of a group: distributed/distributed_checkpoint.hpp.
// With dropout each rank's layers draw the rows of the whole batch's mask that its shard holds
// (the ranks' shards are taken in rank order: rank 0's rows first), so a data-parallel run with
// dropout is, to rounding, one process on the whole batch too.
#include <cstdint>
#include <memory>
#include <vector>

#include "relora/distributed/gradient_buckets.hpp"
#include "relora/optimizers/adam.hpp"
#include "relora/optimizers/optimizer.hpp"
#include "relora/training/model.hpp"
#include "relora/losses/mse_loss.hpp"
#include "relora/training/relora_controller.hpp"
#include "relora/training/schedule.hpp"

namespace relora {

enum class TrainingMethod {
  lora,           // adapters train, never merged
  relora,         // adapters train, merged and restarted every ReloraConfig::restart_every steps
  full_finetune,  // W itself trains (no adapter), the reference a low-rank method is measured against
};

struct TrainerConfig {
  TrainingMethod method = TrainingMethod::lora;
  AdamConfig adam;  // the optimizer's config when `optimizer` is null
  // Builds the optimizer, e.g. optimizer_factory<Adam>(AdamConfig{...}); null: Adam with `adam`.
  std::shared_ptr<const OptimizerFactory> optimizer;
  double lora_plus_ratio = 1;  // B's learning rate over A's (LoRA+, Hayou et al. 2024, suggests 16)
  ReloraConfig relora;         // for TrainingMethod::relora
  // Record the steady step (forward, loss, backward, Adam) once and replay it (CUDA graphs),
  // where the backend can record: one launch per step instead of one per operation. False:
  // every step runs eagerly. The CPU backend cannot record and always runs eagerly.
  bool use_graphs = true;
};

template <typename T>
class Trainer {
 public:
  // `schedule` may be null (constant learning rate); `loss` too (the mean squared error). The model
  // must outlive the trainer. `communicator`, when given, makes the trainer a rank of data-parallel
  // training (above); the loss must then be a mean over the batch's rows, as MSE is. Its device
  // must be the model's backend's.
  Trainer(Model<T>& model, const TrainerConfig& config, std::shared_ptr<Schedule> schedule = nullptr,
          std::shared_ptr<Loss<T>> loss = nullptr, std::shared_ptr<Communicator<T>> communicator = nullptr);

  // One training step on a batch already on the model's backend (data-parallel: this rank's rows of
  // the batch). Nothing in it waits for a GPU, but for the all-reduce of the row counts in a
  // data-parallel step whose row count differs from the last step's.
  void step(const Tensor<T>& X, const Tensor<T>& target);
  // The loss of the last step's batch (data-parallel: the whole batch's), before its update; waits
  // for the backend.
  T loss();

  std::int64_t steps_done() const { return steps_done_; }
  // Resuming: puts the trainer where `steps` steps leave it (what trains, which optimizer).
  void set_steps_done(std::int64_t steps);

  Model<T>& model() { return *model_; }
  Optimizer<T>& optimizer() { return *optimizer_; }
  Loss<T>& loss_function() { return *loss_; }
  Schedule* schedule() { return schedule_.get(); }
  ReloraController<T>* controller() { return controller_ ? controller_.get() : nullptr; }
  const TrainerConfig& config() const { return config_; }
  // The group this trainer is a rank of, or null.
  Communicator<T>* communicator() { return buckets_ ? &buckets_->communicator() : nullptr; }
  GradientBuckets<T>* gradient_buckets() { return buckets_.get(); }
  // Steps recorded and steps replayed so far (both 0 where the backend cannot record).
  std::int64_t recorded_steps() const { return recorded_steps_; }
  std::int64_t replayed_steps() const { return replayed_steps_; }

 private:
  // What a recorded step depends on besides the buffers' addresses (which the backend watches):
  // the batch tensors, the optimizer, and each layer's state. Compared before every replay.
  struct StepShape {
    const T* X = nullptr;
    Index x_rows = 0, x_cols = 0;
    const T* target = nullptr;
    Index target_rows = 0, target_cols = 0;
    std::uint64_t optimizer = 0;         // optimizer_generation_ of the optimizer in use
    std::vector<std::uint32_t> layers;   // per layer: its step_signature()
    bool operator==(const StepShape& o) const {
      return X == o.X && x_rows == o.x_rows && x_cols == o.x_cols && target == o.target &&
             target_rows == o.target_rows && target_cols == o.target_cols && optimizer == o.optimizer &&
             layers == o.layers;
    }
  };

  TrainTarget target_at(std::int64_t step) const;
  void build_optimizer();
  // Forward, MSE, backward and Adam, eagerly or recorded, or one replay of the recorded step.
  void run_step(const Tensor<T>& X, const Tensor<T>& target, double lr_factor);
  void compute(const Tensor<T>& X, const Tensor<T>& target, double lr_factor);
  // Fills shape_now_; false when the step cannot be recorded (a layer is not replayable).
  bool describe_step(const Tensor<T>& X, const Tensor<T>& target);

  Model<T>* model_;
  TrainerConfig config_;
  std::shared_ptr<Schedule> schedule_;
  std::unique_ptr<ReloraController<T>> controller_;
  std::shared_ptr<const OptimizerFactory> optimizer_factory_;  // config_.optimizer, or Adam's
  std::unique_ptr<Optimizer<T>> optimizer_;
  std::shared_ptr<Loss<T>> loss_;
  std::unique_ptr<GradientBuckets<T>> buckets_;  // data-parallel only
  std::int64_t steps_done_ = 0;

  std::uint64_t optimizer_generation_ = 0;  // counts build_optimizer() calls
  StepShape shape_now_;                     // this step's (reused: no allocation per step)
  StepShape eager_shape_;                   // of the last eager step, when eager_valid_
  bool eager_valid_ = false;
  StepShape recorded_shape_;                // of the backend's recording recording_id_
  std::uint64_t recording_id_ = 0;          // 0: none
  int failed_recordings_ = 0;               // in a row; after 3, graphs are given up
  std::int64_t recorded_steps_ = 0;
  std::int64_t replayed_steps_ = 0;
};

extern template class Trainer<float>;
extern template class Trainer<double>;

}  // namespace relora
