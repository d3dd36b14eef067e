#pragma once
// Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019) as one update rule with a
// weight-decay switch, over parameter groups with their own learning rates (LoRA+). Per parameter
// it keeps the moments m and v and its own update count, so that a parameter whose state ReLoRA
// reset is bias-corrected as a fresh one while the others are not.
//
// The update runs in Adam's own kernels, chosen from the backend's device: a CPU loop
// (lib/optimizers/cpu/adam_cpu.cpp) or CUDA kernels (lib/optimizers/cuda/adam_cuda.cu), both
// computing the rule of lib/optimizers/adam_rule.hpp.
//
// Saved state (save_state): tensors "<param>.m", "<param>.v" and "<param>.step" (1 x 1, the
// update count), fields "steps_taken" and "prune_draws" (random-pruning streams used so far).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "relora/optimizers/optimizer.hpp"

namespace relora {

struct AdamConfig {
  double lr = 1e-3;                    // every group's learning rate unless the group sets its own
  double beta1 = 0.9;                  // decay of the first moment
  double beta2 = 0.999;                // decay of the second moment
  double eps = 1e-8;                   // added to sqrt(v_hat), as PyTorch does
  double weight_decay = 0;             // every group's weight decay unless the group sets its own
  bool decoupled_weight_decay = true;  // true: AdamW, p -= lr wd p; false: Adam, g += wd p
};

template <typename T>
class AdamKernels;  // the per-device update and pruning (lib/optimizers/adam_kernels.hpp)

template <typename T>
class Adam final : public Optimizer<T> {
 public:
  Adam(std::shared_ptr<Backend<T>> backend, std::vector<ParamGroup<T>> groups, const AdamConfig& config = {});
  Adam(std::shared_ptr<Backend<T>> backend, std::vector<Parameter<T>> params, const AdamConfig& config = {});
  ~Adam() override;
  Adam(const Adam&) = delete;
  Adam& operator=(const Adam&) = delete;

  const char* kind() const override { return "adam"; }
  void step(double lr_factor = 1) override;
  // Zeroes m, v and the update count: the next update is bias-corrected as a first one.
  void reset_state(const ParameterSelector<T>& which) override;
  // Zeroes the fraction of the entries of m of smallest |m| (or at random) and the same entries
  // of v, keeping the update counts, as ReLoRA's optimizer pruning does.
  void prune_state(const ParameterSelector<T>& which, double fraction, PruneMode mode,
                   std::uint64_t seed = 0) override;

  std::size_t size() const override { return states_.size(); }
  const Parameter<T>& parameter(std::size_t i) const override { return *states_.at(i).param; }
  std::int64_t steps_taken() const override { return steps_taken_; }
  void set_steps_taken(std::int64_t steps) override { steps_taken_ = steps; }

  void save_state(StateDict<T>& state) const override;
  void check_state(const StateDict<T>& state) const override;
  void restore_state(const StateDict<T>& state) override;

  const AdamConfig& config() const { return config_; }
  const std::vector<ParamGroup<T>>& groups() const { return groups_; }
  // Parameter i's state on the backend: m, v and the update count (1 x 1).
  const Tensor<T>& m(std::size_t i) const { return states_.at(i).m; }
  const Tensor<T>& v(std::size_t i) const { return states_.at(i).v; }
  const Tensor<T>& update_count(std::size_t i) const { return states_.at(i).step; }

 private:
  struct State {
    const Parameter<T>* param;
    double lr;
    double weight_decay;
    Tensor<T> m, v, step;
  };

  std::shared_ptr<Backend<T>> backend_;
  std::unique_ptr<AdamKernels<T>> kernels_;
  AdamConfig config_;
  std::vector<ParamGroup<T>> groups_;
  std::vector<State> states_;
  std::int64_t steps_taken_ = 0;
  std::uint64_t prune_draws_ = 0;
};

extern template class Adam<float>;
extern template class Adam<double>;

}  // namespace relora
