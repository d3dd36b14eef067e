#pragma once
// Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019) as one update rule with a
// weight-decay switch, over parameter groups with their own learning rates (LoRA+, Hayou et al.
// 2024, gives B a larger one). The optimizer sees flat parameters, not layers: ReLoRA's restart
// reaches it through reset_moments() and prune_moments().
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "relora/core/backend.hpp"
#include "relora/core/parameter.hpp"

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
struct ParamGroup {
  std::string name;
  std::vector<Parameter<T>> params;
  double lr = -1;            // < 0: AdamConfig::lr
  double weight_decay = -1;  // < 0: AdamConfig::weight_decay
};

// LoRA+ groups: B at lr * ratio (the paper suggests 16), everything else at lr.
template <typename T>
std::vector<ParamGroup<T>> lora_plus_groups(const std::vector<Parameter<T>>& params, double lr, double ratio = 16);

template <typename T>
class Adam {
 public:
  Adam(std::shared_ptr<Backend<T>> backend, std::vector<ParamGroup<T>> groups, const AdamConfig& config = {});
  Adam(std::shared_ptr<Backend<T>> backend, std::vector<Parameter<T>> params, const AdamConfig& config = {});

  // One update of every parameter with lr = group lr * lr_factor (the schedule's factor). If a
  // gradient holds NaN or Inf the step is refused and nothing changes (NonFiniteError: at once
  // on the CPU, at the backend's next synchronize on CUDA).
  void step(double lr_factor = 1);

  // Zeroes m, v and the update count of the parameters `which` selects: the next update is then
  // bias-corrected as a first one.
  void reset_moments(const std::function<bool(const Parameter<T>&)>& which);
  // Zeroes the given fraction of the entries of m and the same entries of v (those of smallest |m|,
  // or at random), keeping the update counts, as ReLoRA's optimizer pruning does.
  void prune_moments(const std::function<bool(const Parameter<T>&)>& which, double fraction, PruneMode mode,
                     std::uint64_t seed = 0);

  const AdamConfig& config() const { return config_; }
  const std::vector<ParamGroup<T>>& groups() const { return groups_; }
  std::size_t size() const { return states_.size(); }
  const Parameter<T>& parameter(std::size_t i) const { return *states_.at(i).param; }
  // Per-parameter state, for checkpoints: m, v and the update count (1 x 1).
  Tensor<T>& m(std::size_t i) { return states_.at(i).m; }
  Tensor<T>& v(std::size_t i) { return states_.at(i).v; }
  Tensor<T>& update_count(std::size_t i) { return states_.at(i).step; }
  std::int64_t steps_taken() const { return steps_taken_; }
  void set_steps_taken(std::int64_t steps) { steps_taken_ = steps; }
  // Random-pruning draws so far (each prune_moments call takes the next streams), for checkpoints.
  std::uint64_t prune_draws() const { return prune_draws_; }
  void set_prune_draws(std::uint64_t draws) { prune_draws_ = draws; }

 private:
  struct State {
    const Parameter<T>* param;
    double lr;
    double weight_decay;
    Tensor<T> m, v, step;
  };

  std::shared_ptr<Backend<T>> backend_;
  AdamConfig config_;
  std::vector<ParamGroup<T>> groups_;
  std::vector<State> states_;
  std::vector<AdamSlot<T>> slots_;  // built once; the pointers stay valid as tensors never move their data
  std::int64_t steps_taken_ = 0;
  std::uint64_t prune_draws_ = 0;
};

extern template class Adam<float>;
extern template class Adam<double>;

}  // namespace relora
