#pragma once
// ReLoRA's restart controller (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank
// Updates"). A sum of low-rank updates can reach a high-rank change: every T steps each adapter
// is merged into its frozen W, a fresh adapter starts (A re-drawn, B = 0, so the model's output
// does not move), the optimizer forgets or prunes what it knew about the old adapter (A, B, and a
// DoRA layer's magnitude m), and the schedule re-warms. It talks to the model, the optimizer and
// the schedule, and belongs to none.
#include <cstdint>
#include <string>

#include "relora/optimizers/optimizer.hpp"
#include "relora/core/state_dict.hpp"
#include "relora/training/model.hpp"
#include "relora/training/schedule.hpp"

namespace relora {

enum class OptimizerReset {
  full,             // forget the optimizer's state of A, B and DoRA's m (Adam: m, v, update counts) (default)
  magnitude_prune,  // zero prune_fraction of the entries of that state of smallest magnitude
  random_prune,     // zero prune_fraction of the entries of that state chosen at random
  none,             // keep the state (shown in the demo to fail)
};

struct ReloraConfig {
  std::int64_t restart_every = 50;         // T: LoRA steps between restarts, >= 1
  OptimizerReset reset = OptimizerReset::full;
  double prune_fraction = 0.999;           // for the pruning resets, in [0, 1]; the paper prunes 99.9%
  std::int64_t restart_warmup_steps = 0;   // re-warmup after each restart, at most T (see jagged_schedule)
  std::int64_t warm_start_steps = 0;       // full-rank steps (W itself trains) before LoRA begins
  std::uint64_t seed = 0;                  // for random pruning
};

// Throws ConfigError naming the value.
void validate(const ReloraConfig& config);

// The schedule ReLoRA wants: warmup + cosine over the run, re-warmed after each restart.
JaggedCosineScheduleConfig jagged_schedule(const ReloraConfig& relora, std::int64_t total_steps,
                                           std::int64_t warmup_steps = 0, double min_lr_ratio = 0.1);

template <typename T>
class ReloraController {
 public:
  explicit ReloraController(const ReloraConfig& config);

  // Whether step `step` (0-based, the step about to be taken) trains W itself.
  bool in_warm_start(std::int64_t step) const { return step < config_.warm_start_steps; }
  // Whether a restart follows once `steps_done` steps have been taken.
  bool restart_due(std::int64_t steps_done) const;

  // Merges every adapter into W, re-initialises it, applies the optimizer reset to the state of
  // A, B and DoRA's m, and tells the schedule (if any) that step `steps_done` starts fresh adapters.
  void restart(Model<T>& model, Optimizer<T>& optimizer, Schedule* schedule, std::int64_t steps_done);

  const ReloraConfig& config() const { return config_; }
  std::int64_t restarts_done() const { return restarts_; }
  void set_restarts_done(std::int64_t restarts) { restarts_ = restarts; }

  // The restarts done, and the period and warm start they were counted with (checked, not
  // restored: a resumed run must restart where the first one would have).
  void save_state(StateDict<T>& state) const;
  // IoError naming the field if `state` does not fit this controller after `steps_done` steps;
  // changes nothing.
  void check_state(const StateDict<T>& state, std::int64_t steps_done) const;
  void restore_state(const StateDict<T>& state, std::int64_t steps_done);

 private:
  ReloraConfig config_;
  std::int64_t restarts_ = 0;
};

extern template class ReloraController<float>;
extern template class ReloraController<double>;

}  // namespace relora
