// The regression demo's ReLoRA run (apps/regression: its data, one layer, alpha = r, Adam lr 1e-2,
// a restart every 50 steps) with 20 restarts, its base in bf16, against the same run in fp32.
// A merge into bf16 rounded to nearest loses every update below half a unit in the last place of
// W (2^-9 |W|); stochastic rounding keeps them on average and the fp32 master exactly. The issue
// asks one of them to end within 10% of fp32's final loss; the test prints all three, and full
// fine-tuning of a bf16 W (through its fp32 master) beside fp32's.
#include <doctest/doctest.h>

#include <random>

#include "options.hpp"
#include "relora/relora.hpp"
#include "test_support.hpp"

using namespace relora;

namespace {

struct Data {
  HostMatrix<float> X, y, W0;
};

// apps/regression/main.cpp's make_data with its defaults: n 200, 10 -> 5, noise 0.1, seed 42.
Data make_data() {
  const Index n = 200, k = 10, d = 5;
  std::mt19937_64 rng(42);
  std::normal_distribution<double> normal(0.0, 1.0);
  const auto draw = [&](Index rows, Index cols, double stddev) {
    Eigen::MatrixXd m(rows, cols);
    for (Index i = 0; i < rows; ++i) {
      for (Index j = 0; j < cols; ++j) m(i, j) = stddev * normal(rng);
    }
    return m;
  };
  const Eigen::MatrixXd X = draw(n, k, 1.0), W_true = draw(d, k, 1.0), noise = draw(n, d, 0.1);
  const Eigen::MatrixXd W0 = draw(d, k, 0.1);
  const Eigen::MatrixXd y = X * W_true.transpose() + noise;
  return {X.cast<float>(), y.cast<float>(), W0.cast<float>()};
}

double final_loss(const Data& data, TrainingMethod method, BasePrecision precision, BaseMerge merge,
                  std::int64_t steps, std::int64_t restart_every = 50, double lr = 1e-2) {
  auto backend = make_backend<float>(Device::cpu);
  Model<float> model(backend);
  const LoraConfig config{.in_features = 10, .out_features = 5, .rank = 4, .alpha = 4, .seed = 42,
                          .base_precision = precision, .base_merge = merge};
  model.add(config, Activation::identity, data.W0, "proj");
  TrainerConfig trainer_config;
  trainer_config.adam.lr = lr;
  trainer_config.method = method;
  trainer_config.relora = {.restart_every = restart_every, .reset = OptimizerReset::full};
  Trainer<float> trainer(model, trainer_config);
  Tensor<float> X = to_backend<float>(*backend, data.X, "X"), y = to_backend<float>(*backend, data.y, "y");
  for (std::int64_t step = 0; step < steps; ++step) trainer.step(X, y);
  trainer.step(X, y);  // the loss after `steps` updates, measured by one more forward
  return double(trainer.loss());
}

}  // namespace

TEST_CASE("bf16 regression demo: ReLoRA with 20 restarts ends within 10% of fp32 (stochastic and master merges)") {
  const Data data = make_data();
  const std::int64_t steps = 20 * 50;
  const double fp32 = final_loss(data, TrainingMethod::relora, BasePrecision::fp32, BaseMerge::stochastic, steps);
  const double stochastic =
      final_loss(data, TrainingMethod::relora, BasePrecision::bf16, BaseMerge::stochastic, steps);
  const double master = final_loss(data, TrainingMethod::relora, BasePrecision::bf16, BaseMerge::fp32_master, steps);
  const double nearest = final_loss(data, TrainingMethod::relora, BasePrecision::bf16, BaseMerge::nearest, steps);
  const double full32 =
      final_loss(data, TrainingMethod::full_finetune, BasePrecision::fp32, BaseMerge::stochastic, steps);
  const double full16 =
      final_loss(data, TrainingMethod::full_finetune, BasePrecision::bf16, BaseMerge::stochastic, steps);
  MESSAGE("ReLoRA, 20 restarts, final loss: fp32 " << fp32 << "; bf16 stochastic " << stochastic << " ("
                                                   << stochastic / fp32 << "x), fp32 master " << master << " ("
                                                   << master / fp32 << "x), nearest " << nearest << " ("
                                                   << nearest / fp32 << "x)");
  MESSAGE("full fine-tuning: fp32 " << full32 << ", bf16 with fp32 master " << full16 << " (" << full16 / full32
                                    << "x)");
  CHECK(stochastic <= 1.10 * fp32);
  CHECK(master <= 1.10 * fp32);
  CHECK(full16 <= 1.10 * full32);
}

TEST_CASE("bf16 regression demo with small merges (a restart every 2 steps, lr 3e-4): nearest falls behind") {
  // 2000 restarts, each merging two small Adam steps: most updates are below half a unit in the
  // last place of W, which round-to-nearest drops at every merge.
  const Data data = make_data();
  const std::int64_t steps = 4000, every = 2;
  const double lr = 3e-4;
  const double fp32 =
      final_loss(data, TrainingMethod::relora, BasePrecision::fp32, BaseMerge::stochastic, steps, every, lr);
  const double stochastic =
      final_loss(data, TrainingMethod::relora, BasePrecision::bf16, BaseMerge::stochastic, steps, every, lr);
  const double master =
      final_loss(data, TrainingMethod::relora, BasePrecision::bf16, BaseMerge::fp32_master, steps, every, lr);
  const double nearest =
      final_loss(data, TrainingMethod::relora, BasePrecision::bf16, BaseMerge::nearest, steps, every, lr);
  MESSAGE("ReLoRA, 2000 restarts, lr 3e-4, final loss: fp32 " << fp32 << "; bf16 stochastic " << stochastic << " ("
                                                               << stochastic / fp32 << "x), fp32 master " << master
                                                               << " (" << master / fp32 << "x), nearest " << nearest
                                                               << " (" << nearest / fp32 << "x)");
  CHECK(stochastic <= 1.02 * fp32);
  CHECK(master <= 1.02 * fp32);
  CHECK(nearest >= 1.10 * fp32);  // what stochastic rounding and the master are for
}

TEST_CASE("relora_regression --precision and --base-merge") {
  const demo::Options o = demo::parse_options({"--precision", "bf16", "--base-merge=master"});
  CHECK(o.precision == BasePrecision::bf16);
  CHECK(o.base_merge == BaseMerge::fp32_master);
  CHECK(demo::parse_options({}).precision == BasePrecision::fp32);
  const std::string message = relora::testing::what_of([] { demo::parse_options({"--precision", "fp8"}); });
  MESSAGE(message);
  CHECK(message.find("fp8") != std::string::npos);
  CHECK(demo::usage_text().find("--precision") != std::string::npos);
}
