// Recorded steps (CUDA graphs) against eager steps: the Trainer records the steady step once and
// replays it; the losses must be those of eager steps, through ReLoRA restarts, a warm start, a
// learning-rate factor that changes every step, and buffers re-sized between steps; a NaN
// gradient met in a replay must still be reported at synchronize() with nothing updated. The
// CUDA cases are skipped, with the reason, where no GPU is visible; the CPU case runs everywhere.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::cuda_or_skip;
using relora::testing::normal_matrix;

namespace {

struct Run {
  std::vector<double> losses;
  std::int64_t recorded = 0, replayed = 0, restarts = 0;
};

// 120 steps of ReLoRA (10 warm-start steps, a restart every 25 LoRA steps with a full optimizer
// reset, jagged cosine with a re-warmup of 5 steps) on a 2-layer model; at step 60 a tensor is
// allocated on the backend, as a re-sized batch buffer would be: the recording goes stale and is
// made anew.
// With dora, DoraLinear layers of the same shapes (the first with a zero row of W, whose column of
// Z the backward recomputes in every step, replays included). Fewer steps stop before the
// allocation (40: the warm start, two recordings and a restart).
Run train(Device device, bool use_graphs, bool dora = false, int steps = 120) {
  std::mt19937_64 gen(11);
  const HostMatrix<float> x = normal_matrix<float>(64, 12, gen), y = normal_matrix<float>(64, 6, gen);
  auto backend = make_backend<float>(device);
  Model<float> model(backend);
  const LoraConfig first{.in_features = 12, .out_features = 16, .rank = 4, .alpha = 8, .bias = BiasMode::trainable,
                         .seed = 3};
  const LoraConfig second{.in_features = 16, .out_features = 6, .rank = 4, .alpha = 8, .seed = 4};
  HostMatrix<float> W1 = normal_matrix<float>(16, 12, gen, 0.3);
  const HostMatrix<float> W2 = normal_matrix<float>(6, 16, gen, 0.3);
  if (dora) {
    W1.row(3).setZero();
    model.add(std::make_unique<DoraLinear<float>>(*backend, DoraConfig{.lora = first}, W1), Activation::relu);
    model.add(std::make_unique<DoraLinear<float>>(*backend, DoraConfig{.lora = second}, W2), Activation::identity);
  } else {
    model.add(first, Activation::relu, W1);
    model.add(second, Activation::identity, W2);
  }
  const ReloraConfig relora{.restart_every = 25, .reset = OptimizerReset::full, .restart_warmup_steps = 5,
                            .warm_start_steps = 10};
  auto schedule = std::make_shared<JaggedCosineSchedule>(jagged_schedule(relora, steps, 8, 0.1));
  TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 5e-3, .weight_decay = 0.01},
                       .lora_plus_ratio = 2, .relora = relora};
  config.use_graphs = use_graphs;
  Trainer<float> trainer(model, config, schedule);
  Tensor<float> X = to_backend<float>(*backend, x, "X"), Y = to_backend<float>(*backend, y, "Y");
  Run run;
  for (int step = 0; step < steps; ++step) {
    if (step == 60) (void)backend->allocate(7, 12);
    trainer.step(X, Y);
    run.losses.push_back(double(trainer.loss()));
  }
  run.recorded = trainer.recorded_steps();
  run.replayed = trainer.replayed_steps();
  run.restarts = trainer.controller()->restarts_done();
  return run;
}

double max_relative_difference(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::abs(a[i] - b[i]) / std::max(std::abs(b[i]), 1e-30));
  }
  return worst;
}

}  // namespace

TEST_CASE("cuda graph: replayed steps give the eager losses over 120 ReLoRA steps with a jagged schedule") {
  if (!cuda_or_skip("CUDA graph test")) return;
  const Run eager = train(Device::cuda, false);
  const Run graph = train(Device::cuda, true);
  const double diff = max_relative_difference(graph.losses, eager.losses);
  MESSAGE("graph vs eager: max relative loss difference " << diff << " over 120 steps; recorded " << graph.recorded
                                                          << ", replayed " << graph.replayed << ", restarts "
                                                          << graph.restarts << "; final loss "
                                                          << graph.losses.back());
  CHECK(eager.recorded == 0);
  CHECK(eager.replayed == 0);
  CHECK(graph.restarts == 4);
  // Recorded at steps 1 (warm start), 11 (adapters, fresh optimizer) and 61 (after the allocation
  // at 60): the restarts in between leave the recording valid.
  CHECK(graph.recorded == 3);
  CHECK(graph.replayed == 120 - 3 - 3);
  CHECK(diff <= 1e-6);
  for (double loss : graph.losses) REQUIRE(std::isfinite(loss));
}

TEST_CASE("cuda graph: DoRA layers (dY scaled in place, a recomputed column) replay the eager losses") {
  if (!cuda_or_skip("CUDA graph test")) return;
  // Under compute-sanitizer's racecheck the 120 steps outlast a case's time limit.
  const int steps = relora::testing::under_sanitizer() ? 40 : 120;
  const Run eager = train(Device::cuda, false, true, steps);
  const Run graph = train(Device::cuda, true, true, steps);
  const double diff = max_relative_difference(graph.losses, eager.losses);
  MESSAGE("DoRA graph vs eager: max relative loss difference " << diff << "; recorded " << graph.recorded
                                                               << ", replayed " << graph.replayed);
  CHECK(graph.replayed > steps - 10);
  CHECK(diff <= 1e-6);
  for (double loss : graph.losses) REQUIRE(std::isfinite(loss));
}

TEST_CASE("cuda graph: a NaN/Inf gradient in a replay is reported at synchronize() and updates nothing") {
  if (!cuda_or_skip("CUDA graph test")) return;
  std::mt19937_64 gen(12);
  HostMatrix<float> x = normal_matrix<float>(40, 10, gen);
  const HostMatrix<float> y = normal_matrix<float>(40, 5, gen);
  auto backend = make_backend<float>(Device::cuda);
  Model<float> model(backend);
  LoraLinear<float>& layer =
      model.add(LoraConfig{.in_features = 10, .out_features = 5, .rank = 4, .alpha = 4}, Activation::identity,
                normal_matrix<float>(5, 10, gen, 0.3));
  layer.set_B(normal_matrix<float>(5, 4, gen, 0.1));
  Trainer<float> trainer(model, TrainerConfig{.adam = {.lr = 1e-2}});
  Tensor<float> X = to_backend<float>(*backend, x, "X"), Y = to_backend<float>(*backend, y, "Y");
  for (int i = 0; i < 4; ++i) trainer.step(X, Y);  // eager, recorded, 2 replays
  backend->synchronize();
  REQUIRE(trainer.replayed_steps() == 2);
  const HostMatrix<float> A = to_host(*backend, layer.A()), B = to_host(*backend, layer.B());
  const HostMatrix<float> count = to_host(*backend, dynamic_cast<Adam<float>&>(trainer.optimizer()).update_count(0));

  // upload() refuses NaN; 1e30 overflows the gradients to Inf in the replay instead.
  x(3, 7) = 1e30f;
  upload<float>(*backend, x, X, "X with a huge entry");  // the same buffer: the recording stays valid
  trainer.step(X, Y);
  CHECK(trainer.replayed_steps() == 3);
  bool reported = false;
  try {
    backend->synchronize();
  } catch (const NonFiniteError& e) {
    reported = true;
    MESSAGE("NonFiniteError: " << std::string(e.what()));
    CHECK(std::string(e.what()).find("layers.0.lora_") != std::string::npos);
  }
  CHECK(reported);
  CHECK((to_host(*backend, layer.A()).array() == A.array()).all());
  CHECK((to_host(*backend, layer.B()).array() == B.array()).all());
  CHECK((to_host(*backend, dynamic_cast<Adam<float>&>(trainer.optimizer()).update_count(0)).array() == count.array()).all());

  // The flag was cleared: with finite data again the replays train on.
  x(3, 7) = 0.5f;
  upload<float>(*backend, x, X, "X");
  trainer.step(X, Y);
  CHECK_NOTHROW(backend->synchronize());
  CHECK(trainer.replayed_steps() == 4);
  CHECK((to_host(*backend, layer.A()).array() != A.array()).any());
  CHECK(to_host(*backend, dynamic_cast<Adam<float>&>(trainer.optimizer()).update_count(0))(0, 0) == count(0, 0) + 1);
}

TEST_CASE("graph option: a backend that cannot record runs every step eagerly, with the same losses") {
  auto losses = [](bool use_graphs, std::int64_t* recorded) {
    std::mt19937_64 gen(13);
    const HostMatrix<float> x = normal_matrix<float>(30, 8, gen), y = normal_matrix<float>(30, 3, gen);
    auto backend = make_backend<float>(Device::cpu);
    Model<float> model(backend);
    model.add(LoraConfig{.in_features = 8, .out_features = 3, .rank = 2, .alpha = 4}, Activation::identity,
              normal_matrix<float>(3, 8, gen, 0.3));
    TrainerConfig config{.adam = {.lr = 1e-2}};
    config.use_graphs = use_graphs;
    Trainer<float> trainer(model, config);
    Tensor<float> X = to_backend<float>(*backend, x, "X"), Y = to_backend<float>(*backend, y, "Y");
    std::vector<double> out;
    for (int i = 0; i < 10; ++i) {
      trainer.step(X, Y);
      out.push_back(trainer.loss());
    }
    *recorded = trainer.recorded_steps() + trainer.replayed_steps();
    return out;
  };
  std::int64_t with = -1, without = -1;
  CHECK(losses(true, &with) == losses(false, &without));
  CHECK(with == 0);
  CHECK(without == 0);
}
