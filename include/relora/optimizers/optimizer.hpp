#pragma once
// The optimizer interface: a step over the parameters it was given, the state operations that
// ReLoRA's restart asks for (reset, prune), and save/restore of its own state. Trainer, the ReLoRA
// controller and checkpoints talk to this interface only; Adam (adam.hpp) is its first
// implementation.
//
// How an optimizer is chosen: TrainerConfig holds an OptimizerFactory, an immutable description
// of the optimizer (its kind and config) that builds one for a backend and parameter groups. The
// Trainer builds a fresh optimizer whenever what trains changes (ReLoRA's warm start ends, a
// checkpoint resumes), so it needs a recipe rather than an instance. A factory is a plain object
// the user makes (`optimizer_factory<Adam>(AdamConfig{...})`), not a name looked up in a
// registry: a new optimizer is its own header, sources and kernels, plus one line in relora.hpp;
// nothing in Backend, Trainer or the controller changes.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "relora/core/backend.hpp"
#include "relora/core/parameter.hpp"
#include "relora/core/state_dict.hpp"

namespace relora {

// How prune_state chooses the entries it zeroes.
enum class PruneMode { magnitude, random };

// Chooses parameters (by role or name) for reset_state and prune_state.
template <typename T>
using ParameterSelector = std::function<bool(const Parameter<T>&)>;

// Parameters that share a learning rate and weight decay.
template <typename T>
struct ParamGroup {
  std::string name;
  std::vector<Parameter<T>> params;
  double lr = -1;            // < 0: the optimizer's configured lr
  double weight_decay = -1;  // < 0: the optimizer's configured weight decay
};

// LoRA+ groups (Hayou et al. 2024): B at lr * ratio (the paper suggests 16), everything else at lr.
template <typename T>
std::vector<ParamGroup<T>> lora_plus_groups(const std::vector<Parameter<T>>& params, double lr, double ratio = 16);

template <typename T>
class Optimizer {
 public:
  virtual ~Optimizer() = default;

  // A short name of the algorithm ("adam"), stored in checkpoints beside the state.
  virtual const char* kind() const = 0;

  // One update of every parameter, each group's lr multiplied by lr_factor (the schedule's
  // factor). If a gradient holds NaN or Inf the whole step is refused and nothing changes
  // (NonFiniteError names the parameter: at once on the CPU, at the backend's next synchronize()
  // on CUDA, so that no step waits for the device). steps_taken() counts the call either way.
  virtual void step(double lr_factor = 1) = 0;

  // Forgets the state of the parameters `which` selects: they continue as if never updated.
  virtual void reset_state(const ParameterSelector<T>& which) = 0;
  // Zeroes `fraction` (in [0, 1]) of the entries of the selected parameters' state: those of
  // smallest magnitude, or chosen at random from streams of `seed` (each call takes new streams).
  virtual void prune_state(const ParameterSelector<T>& which, double fraction, PruneMode mode,
                           std::uint64_t seed = 0) = 0;

  // The parameters, in the order of the groups given.
  virtual std::size_t size() const = 0;
  virtual const Parameter<T>& parameter(std::size_t i) const = 0;

  // Calls of step() so far. Trainer rolls it back when a recorded step is discarded unrun.
  virtual std::int64_t steps_taken() const = 0;
  virtual void set_steps_taken(std::int64_t steps) = 0;

  // Writes every tensor and field the optimizer needs to continue bit for bit, tensors named
  // "<parameter name>.<what>", into `state` (waits for the backend).
  virtual void save_state(StateDict<T>& state) const = 0;
  // Throws IoError naming the entry if `state` cannot be restored (an entry missing or of another
  // shape, a non-finite value, a value out of its range, a tensor of no parameter); changes nothing.
  virtual void check_state(const StateDict<T>& state) const = 0;
  // check_state(), then takes the state over.
  virtual void restore_state(const StateDict<T>& state) = 0;
};

// Builds optimizers of one kind and config. Both element types, because TrainerConfig is not a
// template.
class OptimizerFactory {
 public:
  virtual ~OptimizerFactory() = default;
  virtual std::unique_ptr<Optimizer<float>> make(std::shared_ptr<Backend<float>> backend,
                                                 std::vector<ParamGroup<float>> groups) const = 0;
  virtual std::unique_ptr<Optimizer<double>> make(std::shared_ptr<Backend<double>> backend,
                                                  std::vector<ParamGroup<double>> groups) const = 0;
  // The learning rate of a group that sets none; LoRA+ scales it for B.
  virtual double lr() const = 0;
};

// The factory of an optimizer class template Opt<T> constructed as Opt<T>(backend, groups, config),
// with Config holding a field `lr`.
template <template <typename> class Opt, typename Config>
class ConfiguredOptimizerFactory final : public OptimizerFactory {
 public:
  explicit ConfiguredOptimizerFactory(const Config& config) : config_(config) {}
  std::unique_ptr<Optimizer<float>> make(std::shared_ptr<Backend<float>> backend,
                                         std::vector<ParamGroup<float>> groups) const override {
    return std::make_unique<Opt<float>>(std::move(backend), std::move(groups), config_);
  }
  std::unique_ptr<Optimizer<double>> make(std::shared_ptr<Backend<double>> backend,
                                          std::vector<ParamGroup<double>> groups) const override {
    return std::make_unique<Opt<double>>(std::move(backend), std::move(groups), config_);
  }
  double lr() const override { return config_.lr; }
  const Config& config() const { return config_; }

 private:
  Config config_;
};

// optimizer_factory<Adam>(AdamConfig{.lr = 1e-3}), for TrainerConfig::optimizer.
template <template <typename> class Opt, typename Config>
std::shared_ptr<const OptimizerFactory> optimizer_factory(const Config& config) {
  return std::make_shared<ConfiguredOptimizerFactory<Opt, Config>>(config);
}

extern template std::vector<ParamGroup<float>> lora_plus_groups(const std::vector<Parameter<float>>&, double, double);
extern template std::vector<ParamGroup<double>> lora_plus_groups(const std::vector<Parameter<double>>&, double,
                                                                  double);

}  // namespace relora
