// The optimizer extension point: an optimizer written outside the library (plain SGD, below) is
// built by the Trainer from TrainerConfig::optimizer, restarted by the ReLoRA controller and saved
// in checkpoints through the Optimizer interface alone; Adam built through its factory trains
// exactly as the default.
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "relora/relora.hpp"
#include "test_data.hpp"

using namespace relora;
using relora::testing::normal_matrix;

namespace {

struct SgdConfig {
  double lr = 0.1;
};

// p -= lr * g on the CPU backend's host buffers; its only state is the number of steps (and, to
// show the reset and the checkpoint, how often each parameter was reset).
template <typename T>
class Sgd final : public Optimizer<T> {
 public:
  Sgd(std::shared_ptr<Backend<T>> backend, std::vector<ParamGroup<T>> groups, const SgdConfig& config)
      : backend_(std::move(backend)), config_(config), groups_(std::move(groups)) {
    for (const ParamGroup<T>& group : groups_) {
      for (const Parameter<T>& p : group.params) params_.push_back({&p, group.lr < 0 ? config_.lr : group.lr});
    }
  }
  const char* kind() const override { return "sgd"; }
  void step(double lr_factor) override {
    for (Entry& e : params_) {
      T* p = e.param->value->data();
      const T* g = e.param->grad->data();
      for (Index i = 0; i < e.param->value->size(); ++i) p[i] -= T(e.lr * lr_factor) * g[i];
    }
    ++steps_;
  }
  void reset_state(const ParameterSelector<T>& which) override {
    for (Entry& e : params_) resets_ += which(*e.param) ? 1 : 0;
  }
  void prune_state(const ParameterSelector<T>&, double, PruneMode, std::uint64_t) override {}
  std::size_t size() const override { return params_.size(); }
  const Parameter<T>& parameter(std::size_t i) const override { return *params_.at(i).param; }
  std::int64_t steps_taken() const override { return steps_; }
  void set_steps_taken(std::int64_t steps) override { steps_ = steps; }
  void save_state(StateDict<T>& state) const override {
    state.set("steps_taken", steps_);
    state.set("resets", std::int64_t(resets_));
  }
  void check_state(const StateDict<T>& state) const override {
    state.integer("steps_taken", 0);
    state.integer("resets", 0);
    if (!state.tensors().empty()) throw IoError("sgd state: holds tensors");
  }
  void restore_state(const StateDict<T>& state) override {
    check_state(state);
    steps_ = state.integer("steps_taken", 0);
    resets_ = state.integer("resets", 0);
  }
  std::int64_t resets() const { return resets_; }

 private:
  struct Entry {
    const Parameter<T>* param;
    double lr;
  };
  std::shared_ptr<Backend<T>> backend_;
  SgdConfig config_;
  std::vector<ParamGroup<T>> groups_;
  std::vector<Entry> params_;
  std::int64_t steps_ = 0;
  std::int64_t resets_ = 0;
};

struct Task {
  HostMatrix<float> X, Y, W0;
  Task() {
    std::mt19937_64 gen(3);
    X = normal_matrix<float>(50, 6, gen);
    Y = X * normal_matrix<float>(4, 6, gen).transpose();
    W0 = normal_matrix<float>(4, 6, gen, 0.1);
  }
};

struct Run {
  std::unique_ptr<Model<float>> model;  // outlives the trainer
  std::unique_ptr<Trainer<float>> trainer;
  std::vector<float> losses;
};

Run train(const TrainerConfig& config, int steps) {
  static const Task task;
  auto backend = make_backend<float>(Device::cpu);
  Run run;
  run.model = std::make_unique<Model<float>>(backend);
  run.model->add(LoraConfig{.in_features = 6, .out_features = 4, .rank = 2}, Activation::identity, task.W0);
  run.trainer = std::make_unique<Trainer<float>>(*run.model, config);
  Tensor<float> X = to_backend<float>(*backend, task.X, "X"), Y = to_backend<float>(*backend, task.Y, "Y");
  for (int i = 0; i < steps; ++i) {
    run.trainer->step(X, Y);
    run.losses.push_back(run.trainer->loss());
  }
  return run;
}

}  // namespace

TEST_CASE("optimizer factory: Adam through optimizer_factory trains exactly as TrainerConfig::adam") {
  const AdamConfig adam{.lr = 1e-2, .weight_decay = 0.01};
  const Run by_default = train(TrainerConfig{.adam = adam, .lora_plus_ratio = 4}, 20);
  const Run by_factory = train(TrainerConfig{.optimizer = optimizer_factory<Adam>(adam), .lora_plus_ratio = 4}, 20);
  CHECK(by_default.losses == by_factory.losses);
}

TEST_CASE("optimizer factory: an optimizer from outside the library trains, restarts and checkpoints") {
  const TrainerConfig config{.method = TrainingMethod::relora,
                             .optimizer = optimizer_factory<Sgd>(SgdConfig{.lr = 0.05}),
                             .lora_plus_ratio = 2,
                             .relora = {.restart_every = 5}};
  Run run = train(config, 12);
  Trainer<float>* trainer = run.trainer.get();
  Model<float>& model = *run.model;
  CHECK(run.losses.back() < run.losses.front());
  CHECK(std::string(trainer->optimizer().kind()) == "sgd");
  auto& sgd = dynamic_cast<Sgd<float>&>(trainer->optimizer());
  CHECK(sgd.steps_taken() == 12);
  CHECK(sgd.resets() == 4);  // two restarts, A and B each
  // LoRA+ groups built from the factory's lr: B at 2 x 0.05.
  CHECK(sgd.size() == 2);

  // Its state travels in a checkpoint, with its kind; an Adam trainer refuses it.
  const std::vector<std::uint8_t> bytes = serialize_checkpoint(*trainer);
  Trainer<float> again(model, config);
  load_checkpoint_from_bytes(bytes.data(), bytes.size(), again, "sgd.ckpt");
  CHECK(again.optimizer().steps_taken() == 12);
  CHECK(dynamic_cast<Sgd<float>&>(again.optimizer()).resets() == 4);
  TrainerConfig adam_config = config;
  adam_config.optimizer = nullptr;
  Trainer<float> adam_trainer(model, adam_config);
  CHECK_THROWS_WITH_AS(load_checkpoint_from_bytes(bytes.data(), bytes.size(), adam_trainer, "sgd.ckpt"),
                       doctest::Contains("the optimizer state is sgd's but the trainer's optimizer is adam"), IoError);
}
