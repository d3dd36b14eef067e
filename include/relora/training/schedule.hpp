#pragma once
// Learning-rate schedules. A schedule gives a FACTOR at a step; the optimizer multiplies every
// parameter group's learning rate by it (Adam's `lr_factor`), so LoRA+'s larger rate for B keeps
// its ratio to A's through warmups and decays.
//
// Steps are 0-based and name the step about to be taken: factor(0) scales the first update.
// Every warmup here is (steps_into_warmup + 1) / warmup_steps, so the first step of a warmup
// moves the weights a little instead of being wasted at factor 0, and the warmup's last step
// reaches the full value.
#include <cstdint>
#include <string>
#include <vector>

namespace relora {

// The mutable part of a schedule, for checkpoints. The configs are not in it: a checkpoint is
// resumed with the same configs, and only what training changed must travel.
struct ScheduleState {
  // Steps at which the ReLoRA controller restarted the adapters, strictly increasing.
  // Empty for schedules that ignore restarts.
  std::vector<std::int64_t> restart_steps;
};

class Schedule {
 public:
  virtual ~Schedule();

  // Learning-rate factor for `step` (>= 0; ConfigError otherwise).
  virtual double factor(std::int64_t step) const = 0;

  // The ReLoRA controller calls this when it restarts the adapters at `step` (the first step
  // trained by the fresh adapters). Schedules without a re-warmup ignore it.
  virtual void on_restart(std::int64_t step) { (void)step; }

  // One line naming the schedule and its configuration, for logs.
  virtual std::string describe() const = 0;

  // Save and restore the mutable state. restore() throws ConfigError on a state this schedule
  // could not have produced (restarts given to a schedule that ignores them, unsorted steps).
  virtual ScheduleState save() const { return {}; }
  virtual void restore(const ScheduleState& state);
};

// ---------------------------------------------------------------------------------------------
// Constant: factor 1, after an optional linear warmup.

struct ConstantScheduleConfig {
  std::int64_t warmup_steps = 0;  // 0: no warmup, factor 1 from step 0
};

class ConstantSchedule final : public Schedule {
 public:
  explicit ConstantSchedule(ConstantScheduleConfig config = {});
  double factor(std::int64_t step) const override;
  std::string describe() const override;
  const ConstantScheduleConfig& config() const { return config_; }

 private:
  ConstantScheduleConfig config_;
};

// ---------------------------------------------------------------------------------------------
// Linear warmup, then cosine decay (SGDR, Loshchilov & Hutter 2017, without its restarts):
//   step < w:         (step + 1) / w
//   w <= step < T:    m + (1 - m) * (1 + cos(pi * (step - w) / (T - w))) / 2
//   step >= T:        m
// with w = warmup_steps, T = total_steps, m = min_lr_ratio.

struct WarmupCosineScheduleConfig {
  std::int64_t warmup_steps = 0;  // linear warmup length; 0 starts the cosine at factor 1
  std::int64_t total_steps = 0;   // the run's length, where the cosine reaches m; must be set (> 0)
  double min_lr_ratio = 0.1;      // floor of the decay, as a fraction of the peak, in [0, 1]
};

class WarmupCosineSchedule final : public Schedule {
 public:
  explicit WarmupCosineSchedule(WarmupCosineScheduleConfig config);
  double factor(std::int64_t step) const override;
  std::string describe() const override;
  const WarmupCosineScheduleConfig& config() const { return config_; }

 private:
  WarmupCosineScheduleConfig config_;
};

// ---------------------------------------------------------------------------------------------
// ReLoRA's jagged cosine (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank
// Updates"): the warmup + cosine above over the whole run, and after every restart a linear
// re-warmup back up to it. A freshly re-drawn adapter meets optimizer moments that were just
// reset; a full-size step at that moment can throw the model off, so the rate ramps up again:
//   factor(step) = envelope(step) * min(1, (step - r + 1) / restart_warmup_steps)
// with r the last restart at or before `step`. The ramp multiplies the envelope at the same step,
// so it never exceeds the cosine and meets it exactly when the re-warmup ends.

struct JaggedCosineScheduleConfig {
  std::int64_t warmup_steps = 0;           // initial linear warmup, as in WarmupCosine
  std::int64_t total_steps = 0;            // the run's length; must be set (> 0)
  double min_lr_ratio = 0.1;               // floor of the cosine, in [0, 1]
  std::int64_t restart_warmup_steps = 50;  // re-warmup after each restart; the paper uses 50-100.
                                           // 0: restarts leave the rate alone. The controller
                                           // checks it is shorter than the restart period.
};

class JaggedCosineSchedule final : public Schedule {
 public:
  explicit JaggedCosineSchedule(JaggedCosineScheduleConfig config);
  double factor(std::int64_t step) const override;
  // Records a restart. Restarts come in increasing step order; the same step twice is
  // recorded once (a controller replaying a restart after a resume), an earlier one throws.
  void on_restart(std::int64_t step) override;
  std::string describe() const override;
  ScheduleState save() const override { return {restart_steps_}; }
  void restore(const ScheduleState& state) override;

  const JaggedCosineScheduleConfig& config() const { return config_; }
  const std::vector<std::int64_t>& restart_steps() const { return restart_steps_; }

 private:
  JaggedCosineScheduleConfig config_;
  std::vector<std::int64_t> restart_steps_;
};

// Validation, in one place; each throws ConfigError naming the offending value.
void validate(const ConstantScheduleConfig& config);
void validate(const WarmupCosineScheduleConfig& config);
void validate(const JaggedCosineScheduleConfig& config);

}  // namespace relora
