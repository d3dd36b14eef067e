// The ReLoRA controller: restarts at the right steps, loss continuity across a restart, each
// optimizer reset mode, config errors, and ReLoRA beating LoRA's rank ceiling end to end.
#include <doctest/doctest.h>

#include <limits>
#include <random>

#include "relora/relora.hpp"
#include "test_data.hpp"

using namespace relora;
using relora::testing::normal_matrix;

namespace {

// The seed task in small: the needed change W_true - W0 has full rank 5, the adapter rank 2.
struct RegressionTask {
  HostMatrix<float> X, Y, W0;
  explicit RegressionTask(std::uint64_t seed, Index n = 100, Index k = 8, Index d = 5) {
    std::mt19937_64 gen(seed);
    X = normal_matrix<float>(n, k, gen);
    const HostMatrix<float> W_true = normal_matrix<float>(d, k, gen);
    Y = X * W_true.transpose() + normal_matrix<float>(n, d, gen, 0.05);
    W0 = normal_matrix<float>(d, k, gen, 0.1);
  }
};

}  // namespace

TEST_CASE("restarts happen after exactly every T LoRA steps, after the warm start") {
  auto backend = make_backend<float>(Device::cpu);
  RegressionTask task(1);
  Model<float> model(backend);
  model.add(LoraConfig{.in_features = 8, .out_features = 5, .rank = 2}, Activation::identity, task.W0);
  TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-2},
                       .relora = {.restart_every = 7, .restart_warmup_steps = 3, .warm_start_steps = 4}};
  auto schedule = std::make_shared<JaggedCosineSchedule>(jagged_schedule(config.relora, 40, 0, 1.0));
  Trainer<float> trainer(model, config, schedule);
  Tensor<float> X = to_backend<float>(*backend, task.X, "X"), Y = to_backend<float>(*backend, task.Y, "Y");
  std::vector<std::int64_t> restart_after;
  for (int step = 0; step < 40; ++step) {
    const std::int64_t before = trainer.controller()->restarts_done();
    trainer.step(X, Y);
    CHECK(model.lora(0).train_target() == (step < 4 ? TrainTarget::base : TrainTarget::adapter));
    if (trainer.controller()->restarts_done() != before) restart_after.push_back(trainer.steps_done());
  }
  CHECK(restart_after == std::vector<std::int64_t>{11, 18, 25, 32, 39});
  CHECK(schedule->restart_steps() == restart_after);
  CHECK(schedule->factor(11) == doctest::Approx(1.0 / 3));  // re-warmup after the restart
}

TEST_CASE("the loss just before and just after a restart agree to float rounding") {
  auto backend = make_backend<float>(Device::cpu);
  RegressionTask task(2);
  std::mt19937_64 gen(3);
  Model<float> model(backend);
  model.add(LoraConfig{.in_features = 8, .out_features = 6, .rank = 3, .dropout = 0.0, .bias = BiasMode::trainable},
            Activation::tanh, normal_matrix<float>(6, 8, gen));
  model.add(LoraConfig{.in_features = 6, .out_features = 5, .rank = 2}, Activation::identity, task.W0.leftCols(6));
  TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-2}, .relora = {.restart_every = 1000}};
  Trainer<float> trainer(model, config);
  Tensor<float> X = to_backend<float>(*backend, task.X, "X"), Y = to_backend<float>(*backend, task.Y, "Y");
  for (int i = 0; i < 30; ++i) trainer.step(X, Y);
  MseLoss<float> probe(*backend);
  probe.forward_backward(model.forward(X), Y);
  const float before = probe.value();
  const HostMatrix<float> B_before = to_host(*backend, model.lora(1).B());
  const HostMatrix<float> A_before = to_host(*backend, model.lora(1).A());
  CHECK(B_before.norm() > 0);  // the adapter has learnt something to merge
  trainer.controller()->restart(model, trainer.optimizer(), nullptr, trainer.steps_done());
  probe.forward_backward(model.forward(X), Y);
  const float after = probe.value();
  INFO("loss before " << before << ", after " << after);
  CHECK(std::abs(after - before) <= 1e-6f * before);
  CHECK(to_host(*backend, model.lora(1).B()).norm() == 0);
  CHECK((to_host(*backend, model.lora(1).A()) - A_before).norm() > 0);  // a fresh A was drawn
}

TEST_CASE("each optimizer reset mode does what it says to A's and B's moments only") {
  for (OptimizerReset reset : {OptimizerReset::full, OptimizerReset::magnitude_prune, OptimizerReset::random_prune,
                               OptimizerReset::none}) {
    CAPTURE(int(reset));
    auto backend = make_backend<float>(Device::cpu);
    RegressionTask task(4, 50, 40, 30);
    Model<float> model(backend);
    model.add(LoraConfig{.in_features = 40, .out_features = 30, .rank = 5, .bias = BiasMode::trainable},
              Activation::identity, task.W0);
    TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-3},
                         .relora = {.restart_every = 1000, .reset = reset, .prune_fraction = 0.25}};
    Trainer<float> trainer(model, config);
    Tensor<float> X = to_backend<float>(*backend, task.X, "X"), Y = to_backend<float>(*backend, task.Y, "Y");
    for (int i = 0; i < 3; ++i) trainer.step(X, Y);
    auto& adam = dynamic_cast<Adam<float>&>(trainer.optimizer());
    REQUIRE(adam.size() == 3);  // A, B, bias
    std::vector<HostMatrix<float>> m_before, v_before;
    for (std::size_t i = 0; i < adam.size(); ++i) {
      m_before.push_back(to_host(*backend, adam.m(i)));
      v_before.push_back(to_host(*backend, adam.v(i)));
      REQUIRE((m_before[i].array() == 0).count() == 0);
    }
    trainer.controller()->restart(model, adam, nullptr, trainer.steps_done());
    for (std::size_t i = 0; i < adam.size(); ++i) {
      const HostMatrix<float> m = to_host(*backend, adam.m(i)), v = to_host(*backend, adam.v(i));
      const bool adapter = adam.parameter(i).role != ParamRole::bias;
      const Index zeros = (m.array() == 0).count();
      const float count = to_host(*backend, adam.update_count(i))(0, 0);
      const Index expected_zeros = !adapter || reset == OptimizerReset::none ? 0
                                   : reset == OptimizerReset::full         ? m.size()
                                                                           : std::llround(0.25 * double(m.size()));
      INFO(adam.parameter(i).name);
      CHECK(zeros == expected_zeros);
      CHECK((v.array() == 0).count() == expected_zeros);
      CHECK(count == (adapter && reset == OptimizerReset::full ? 0.0f : 3.0f));
      if (reset == OptimizerReset::magnitude_prune && adapter) {
        // every zeroed entry was no larger than every kept one
        const float largest_pruned = (m.array() == 0).select(m_before[i].array().abs(), 0.0f).maxCoeff();
        const float smallest_kept = (m.array() != 0).select(m_before[i].array().abs(), 1e30f).minCoeff();
        CHECK(largest_pruned <= smallest_kept);
      }
      if (expected_zeros == 0) {
        CHECK(m == m_before[i]);
      }
    }
  }
}

TEST_CASE("bad ReLoRA configs are refused with the value") {
  CHECK_THROWS_WITH_AS(ReloraController<float>(ReloraConfig{.restart_every = 0}),
                       doctest::Contains("restart_every 0 must be >= 1"), ConfigError);
  CHECK_THROWS_WITH_AS(ReloraController<float>(ReloraConfig{.prune_fraction = 1.5}),
                       doctest::Contains("prune_fraction 1.500000 must be in [0, 1]"), ConfigError);
  CHECK_THROWS_WITH_AS(ReloraController<float>(ReloraConfig{.restart_every = 10, .restart_warmup_steps = 11}),
                       doctest::Contains("restart_warmup_steps 11 must be in [0, restart_every = 10]"), ConfigError);
  CHECK_THROWS_AS(ReloraController<float>(ReloraConfig{.warm_start_steps = -1}), ConfigError);
}

TEST_CASE("ReLoRA breaks LoRA's rank ceiling on a task that needs a higher-rank change") {
  auto backend = make_backend<float>(Device::cpu);
  RegressionTask task(5);
  auto final_loss = [&](TrainingMethod method) {
    Model<float> model(backend);
    model.add(LoraConfig{.in_features = 8, .out_features = 5, .rank = 2, .alpha = 2}, Activation::identity, task.W0);
    TrainerConfig config{.method = method, .adam = {.lr = 1e-2}, .relora = {.restart_every = 50}};
    Trainer<float> trainer(model, config);
    Tensor<float> X = to_backend<float>(*backend, task.X, "X"), Y = to_backend<float>(*backend, task.Y, "Y");
    for (int i = 0; i < 600; ++i) trainer.step(X, Y);
    trainer.step(X, Y);
    return double(trainer.loss());
  };
  const double lora = final_loss(TrainingMethod::lora);
  const double relora = final_loss(TrainingMethod::relora);
  const double full = final_loss(TrainingMethod::full_finetune);
  MESSAGE("final loss: LoRA " << lora << ", ReLoRA " << relora << ", full fine-tuning " << full);
  CHECK(relora * 10 < lora);
  CHECK(relora < 0.01);  // the noise variance is 0.0025
}

TEST_CASE("ReLoRA with magnitude pruning of the moments and a jagged schedule trains stably") {
  auto backend = make_backend<float>(Device::cpu);
  RegressionTask task(6);
  Model<float> model(backend);
  model.add(LoraConfig{.in_features = 8, .out_features = 5, .rank = 2, .alpha = 2}, Activation::identity, task.W0);
  TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-2},
                       .relora = {.restart_every = 50, .reset = OptimizerReset::magnitude_prune,
                                  .prune_fraction = 0.9, .restart_warmup_steps = 10}};
  auto schedule = std::make_shared<JaggedCosineSchedule>(jagged_schedule(config.relora, 800, 0, 0.1));
  Trainer<float> trainer(model, config, schedule);
  Tensor<float> X = to_backend<float>(*backend, task.X, "X"), Y = to_backend<float>(*backend, task.Y, "Y");
  std::vector<double> losses;
  for (int i = 0; i < 801; ++i) {
    trainer.step(X, Y);
    losses.push_back(trainer.loss());  // the loss before step i's update
  }
  // After each restart the loss may wobble, but never climbs far above where the restart found it.
  double worst_ratio = 0;
  for (int restart = 50; restart < 800; restart += 50) {
    for (int i = restart; i < restart + 50 && i <= 800; ++i) {
      worst_ratio = std::max(worst_ratio, losses[std::size_t(i)] / losses[std::size_t(restart)]);
    }
  }
  MESSAGE("ReLoRA with 90% magnitude pruning: loss " << losses.back() << ", worst rise after a restart x"
                                                     << worst_ratio);
  CHECK(worst_ratio < 1.5);
  CHECK(losses.back() < 0.01);  // the noise variance is 0.0025; LoRA's rank-2 ceiling is far above
}

TEST_CASE("a restart whose merge is refused changes no layer and no optimizer state") {
  RegressionTask task(31);
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937 gen(1);
  Model<float> model(backend);
  model.add(LoraConfig{.in_features = 8, .out_features = 6, .rank = 2, .alpha = 4, .seed = 1}, Activation::relu,
            normal_matrix<float>(6, 8, gen));
  model.add(LoraConfig{.in_features = 6, .out_features = 5, .rank = 2, .alpha = 4, .seed = 2}, Activation::identity,
            task.W0.leftCols(6));
  TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-2}, .relora = {.restart_every = 1000}};
  Trainer<float> trainer(model, config);
  Tensor<float> x = to_backend<float>(*backend, task.X, "X"), y = to_backend<float>(*backend, task.Y, "Y");
  for (int step = 0; step < 5; ++step) trainer.step(x, y);
  const HostMatrix<float> W0 = to_host(*backend, model.lora(0).W()), A0 = to_host(*backend, model.lora(0).A());
  backend->fill(const_cast<Tensor<float>&>(model.lora(1).B()), std::numeric_limits<float>::infinity());
  CHECK_THROWS_AS(trainer.controller()->restart(model, trainer.optimizer(), nullptr, 5), ConfigError);
  CHECK_FALSE(model.lora(0).merged());
  CHECK(to_host(*backend, model.lora(0).W()) == W0);  // the first layer's merge was never started
  CHECK(to_host(*backend, model.lora(0).A()) == A0);
  CHECK(trainer.controller()->restarts_done() == 0);
}
