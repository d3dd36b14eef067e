#include "relora/training/schedule.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "relora/core/errors.hpp"

namespace relora {
namespace {

constexpr double kPi = 3.14159265358979323846;

void require_non_negative_step(std::int64_t step, const char* what) {
  if (step < 0) throw ConfigError(std::string(what) + " must be >= 0, got " + std::to_string(step));
}

// (steps_into + 1) / warmup_steps while warming up, 1 after; see the header for why "+ 1".
double linear_warmup(std::int64_t steps_into, std::int64_t warmup_steps) {
  if (steps_into >= warmup_steps) return 1.0;
  return static_cast<double>(steps_into + 1) / static_cast<double>(warmup_steps);
}

// Warmup then cosine from 1 down to min_lr_ratio at total_steps, flat after.
double warmup_cosine(std::int64_t step, std::int64_t warmup_steps, std::int64_t total_steps,
                     double min_lr_ratio) {
  if (step < warmup_steps) return linear_warmup(step, warmup_steps);
  // Checked before the division: warmup_steps == total_steps leaves no cosine phase at all.
  if (step >= total_steps) return min_lr_ratio;
  const double progress =
      static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
  return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + std::cos(kPi * progress));
}

void validate_cosine(std::int64_t warmup_steps, std::int64_t total_steps, double min_lr_ratio,
                     const char* schedule) {
  const std::string prefix = std::string(schedule) + ": ";
  if (total_steps <= 0) {
    throw ConfigError(prefix + "total_steps must be > 0 (the run's length), got " +
                      std::to_string(total_steps));
  }
  if (warmup_steps < 0) {
    throw ConfigError(prefix + "warmup_steps must be >= 0, got " + std::to_string(warmup_steps));
  }
  if (warmup_steps > total_steps) {
    throw ConfigError(prefix + "warmup_steps (" + std::to_string(warmup_steps) +
                      ") must not exceed total_steps (" + std::to_string(total_steps) + ")");
  }
  // Written as a negated range test so that NaN fails it too.
  if (!(min_lr_ratio >= 0.0 && min_lr_ratio <= 1.0)) {
    std::ostringstream value;
    value << min_lr_ratio;
    throw ConfigError(prefix + "min_lr_ratio must be in [0, 1], got " + value.str());
  }
}

void validate_restart_steps(const std::vector<std::int64_t>& steps) {
  for (std::size_t i = 0; i < steps.size(); ++i) {
    require_non_negative_step(steps[i], "restart step");
    if (i > 0 && steps[i] <= steps[i - 1]) {
      throw ConfigError("schedule state: restart steps must be strictly increasing, got " +
                        std::to_string(steps[i - 1]) + " then " + std::to_string(steps[i]));
    }
  }
}

}  // namespace

Schedule::~Schedule() = default;

void Schedule::restore(const ScheduleState& state) {
  if (!state.restart_steps.empty()) {
    throw ConfigError(describe() + " ignores restarts, but the state to restore holds " +
                      std::to_string(state.restart_steps.size()) + " restart step(s)");
  }
}

// --- validation -------------------------------------------------------------------------------

void validate(const ConstantScheduleConfig& config) {
  if (config.warmup_steps < 0) {
    throw ConfigError("constant schedule: warmup_steps must be >= 0, got " +
                      std::to_string(config.warmup_steps));
  }
}

void validate(const WarmupCosineScheduleConfig& config) {
  validate_cosine(config.warmup_steps, config.total_steps, config.min_lr_ratio,
                  "warmup-cosine schedule");
}

void validate(const JaggedCosineScheduleConfig& config) {
  const char* name = "jagged cosine schedule";
  validate_cosine(config.warmup_steps, config.total_steps, config.min_lr_ratio, name);
  if (config.restart_warmup_steps < 0) {
    throw ConfigError(std::string(name) + ": restart_warmup_steps must be >= 0, got " +
                      std::to_string(config.restart_warmup_steps));
  }
  if (config.restart_warmup_steps > config.total_steps) {
    throw ConfigError(std::string(name) + ": restart_warmup_steps (" +
                      std::to_string(config.restart_warmup_steps) +
                      ") must not exceed total_steps (" + std::to_string(config.total_steps) + ")");
  }
}

// --- constant ---------------------------------------------------------------------------------

ConstantSchedule::ConstantSchedule(ConstantScheduleConfig config) : config_(config) {
  validate(config_);
}

double ConstantSchedule::factor(std::int64_t step) const {
  require_non_negative_step(step, "step");
  return linear_warmup(step, config_.warmup_steps);
}

std::string ConstantSchedule::describe() const {
  return "constant(warmup_steps=" + std::to_string(config_.warmup_steps) + ")";
}

// --- warmup + cosine --------------------------------------------------------------------------

WarmupCosineSchedule::WarmupCosineSchedule(WarmupCosineScheduleConfig config) : config_(config) {
  validate(config_);
}

double WarmupCosineSchedule::factor(std::int64_t step) const {
  require_non_negative_step(step, "step");
  return warmup_cosine(step, config_.warmup_steps, config_.total_steps, config_.min_lr_ratio);
}

std::string WarmupCosineSchedule::describe() const {
  std::ostringstream out;
  out << "warmup_cosine(warmup_steps=" << config_.warmup_steps
      << ", total_steps=" << config_.total_steps << ", min_lr_ratio=" << config_.min_lr_ratio
      << ")";
  return out.str();
}

// --- jagged cosine ----------------------------------------------------------------------------

JaggedCosineSchedule::JaggedCosineSchedule(JaggedCosineScheduleConfig config) : config_(config) {
  validate(config_);
}

double JaggedCosineSchedule::factor(std::int64_t step) const {
  require_non_negative_step(step, "step");
  const double envelope =
      warmup_cosine(step, config_.warmup_steps, config_.total_steps, config_.min_lr_ratio);
  // The last restart at or before `step`. Searching (rather than keeping only the latest
  // restart) keeps factor() a pure function of the step, so a log or a plot can ask any step.
  const auto after = std::upper_bound(restart_steps_.begin(), restart_steps_.end(), step);
  if (after == restart_steps_.begin()) return envelope;
  const std::int64_t last_restart = *(after - 1);
  return envelope * linear_warmup(step - last_restart, config_.restart_warmup_steps);
}

void JaggedCosineSchedule::on_restart(std::int64_t step) {
  require_non_negative_step(step, "restart step");
  if (!restart_steps_.empty()) {
    const std::int64_t last = restart_steps_.back();
    if (step == last) return;
    if (step < last) {
      throw ConfigError("jagged cosine schedule: restart at step " + std::to_string(step) +
                        " comes before the last recorded restart at step " + std::to_string(last));
    }
  }
  restart_steps_.push_back(step);
}

void JaggedCosineSchedule::restore(const ScheduleState& state) {
  validate_restart_steps(state.restart_steps);
  restart_steps_ = state.restart_steps;
}

std::string JaggedCosineSchedule::describe() const {
  std::ostringstream out;
  out << "jagged_cosine(warmup_steps=" << config_.warmup_steps
      << ", total_steps=" << config_.total_steps << ", min_lr_ratio=" << config_.min_lr_ratio
      << ", restart_warmup_steps=" << config_.restart_warmup_steps
      << ", restarts=" << restart_steps_.size() << ")";
  return out.str();
}

}  // namespace relora
