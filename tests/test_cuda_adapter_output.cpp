// A model's last layer with the MSE fused into its forward (CudaAdapterLoraLinear::forward_with_loss, on CUDA
// cuda_adapter_output.cu): Y, dY, dB and db must be the bits of the separate passes (forward,
// MSE, backward on the same GPU), dA and the loss theirs within rounding, everything the CPU's
// within rounding; the gradients of the fused loss must match central differences in double; the
// path must be taken only where it applies, and a backend without it must fall back. (The CPU's
// own fused output layer, for tiny layers, is tested in test_cpu_fused_mse.cpp.)
#include <doctest/doctest.h>

#include <random>
#include <string>
#include <vector>

#include "gradient_check.hpp"
#include "lora_layer_run.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::cuda_or_skip;
using relora::testing::normal_matrix;
using relora::testing::relative_error;
using relora::testing::LossRun;
using relora::testing::run_last_layer;

namespace {

using Shape = relora::testing::LayerShape;

// Shapes that take the fused pass: layer1k; 16-byte rows and odd ones (d = 33, 130 with an odd
// k); each rank bucket; a single output column; more row groups than the loss has partials
// (9000 rows: the blocks stride over rows).
const std::vector<Shape>& output_shapes() {
  static const std::vector<Shape> shapes = {
      {1024, 1024, 1024, 16}, {300, 200, 130, 16}, {77, 40, 300, 3}, {130, 64, 33, 32},
      {9000, 40, 36, 2},      {5, 33, 1, 1},
  };
  return shapes;
}

template <typename T>
void check_fused_against_separate(double cpu_tolerance) {
  auto gpu = make_backend<T>(Device::cuda);
  auto cpu = make_backend<T>(Device::cpu);
  for (const Shape& s : output_shapes()) {
    // Under the sanitizer layer1k is left out: {300, 200, 130, 16} runs the same rank bucket.
    if (relora::testing::under_sanitizer() && s.n * s.k >= 1024 * 1024) continue;
    for (BiasMode bias : {BiasMode::trainable, BiasMode::frozen, BiasMode::none}) {
      CAPTURE(s.n);
      CAPTURE(s.k);
      CAPTURE(s.d);
      CAPTURE(s.r);
      CAPTURE(int(bias));
      const LossRun<T> fused = run_last_layer<T>(*gpu, s, bias, LayerChoice::fastest, true);
      const LossRun<T> passes = run_last_layer<T>(*gpu, s, bias, LayerChoice::fastest, false);
      const LossRun<T> reference = run_last_layer<T>(*cpu, s, bias, LayerChoice::reference, true);
      REQUIRE(fused.fused);
      // The same computation, value for value, up to the order of two sums: dU (so dA) is added
      // in two halves of the row, the loss over other blocks.
      const double rounding = sizeof(T) == 4 ? 1e-6 : 1e-14;
      CHECK(fused.Y == passes.Y);
      CHECK(fused.dY == passes.dY);
      CHECK(fused.dB == passes.dB);
      CHECK(fused.db == passes.db);
      CHECK(relative_error(fused.dA.template cast<double>(), passes.dA.template cast<double>()) < rounding);
      CHECK(fused.loss == doctest::Approx(passes.loss).epsilon(rounding));
      relora::testing::expect_close_loss_runs(fused, reference, cpu_tolerance, "the CPU");
    }
  }
}

}  // namespace

TEST_CASE("cuda fused output layer: the separate passes' Y, dY, dB, db bit for bit, dA and the loss within rounding") {
  if (!cuda_or_skip("cuda fused output layer")) return;
  check_fused_against_separate<float>(1e-5);
  check_fused_against_separate<double>(1e-12);
}

TEST_CASE("cuda fused output layer: gradients of the fused loss match finite differences in double") {
  if (!cuda_or_skip("cuda fused output layer")) return;
  auto backend = make_backend<double>(Device::cuda);
  relora::testing::check_fused_loss_gradients(*backend, {37, 40, 33, 5}, /*need_dX=*/false);
}

TEST_CASE("cuda fused output layer: taken only for wide layers of small rank, never for the reference choice") {
  if (!cuda_or_skip("cuda fused output layer")) return;
  auto gpu = make_backend<float>(Device::cuda);
  using relora::testing::implementation_for;
  CHECK(implementation_for(*gpu, {64, 96, 40, 8}) == "cuda_adapter");
  CHECK(implementation_for(*gpu, {200, 10, 5, 4}) == "cuda_tiny");       // tiny: its own one-kernel forward
  CHECK(implementation_for(*gpu, {64, 96, 40, 33}) == "reference");      // rank over the passes' limit
  CHECK(run_last_layer<float>(*gpu, {64, 96, 40, 8}, BiasMode::none, LayerChoice::reference, true).fused == false);
}

TEST_CASE("forward_with_loss: the reference layer's is forward then the loss, and a target of the wrong shape is named") {
  auto cpu = make_backend<double>(Device::cpu);
  std::mt19937 gen(3);
  Model<double> model(cpu, LayerChoice::reference);
  model.add(LoraConfig{.in_features = 6, .out_features = 5, .rank = 2, .alpha = 4, .seed = 1}, Activation::identity,
            normal_matrix<double>(5, 6, gen));
  Tensor<double> X = to_backend<double>(*cpu, normal_matrix<double>(4, 6, gen), "X");
  Tensor<double> target = to_backend<double>(*cpu, normal_matrix<double>(4, 5, gen), "target");
  MseLoss<double> mse(*cpu), separate(*cpu);
  model.forward_with_loss(X, mse, target);
  const HostMatrix<double> output = to_host(*cpu, model.output());
  const HostMatrix<double> gradient = to_host(*cpu, mse.gradient());
  CHECK(output == to_host(*cpu, model.forward(X)));
  separate.compute(model.output(), target);
  CHECK(gradient == to_host(*cpu, separate.gradient()));
  CHECK(mse.value() == separate.value());

  Tensor<double> wrong = to_backend<double>(*cpu, normal_matrix<double>(4, 3, gen), "wrong target");
  try {
    model.forward_with_loss(X, mse, wrong);
    FAIL("a 4 x 3 target for a 4 x 5 prediction was taken");
  } catch (const ShapeError& e) {
    CHECK(std::string(e.what()).find("[4 x 5]") != std::string::npos);
    CHECK(std::string(e.what()).find("[4 x 3]") != std::string::npos);
  }
}

TEST_CASE("cuda fused output layer: a ReLU after the last layer keeps the separate MSE") {
  if (!cuda_or_skip("cuda fused output layer")) return;
  auto gpu = make_backend<float>(Device::cuda);
  std::mt19937 gen(4);
  Model<float> model(gpu);
  model.add(LoraConfig{.in_features = 96, .out_features = 40, .rank = 8, .alpha = 16, .seed = 1}, Activation::relu,
            normal_matrix<float>(40, 96, gen));
  Tensor<float> X = to_backend<float>(*gpu, normal_matrix<float>(64, 96, gen), "X");
  Tensor<float> target = to_backend<float>(*gpu, normal_matrix<float>(64, 40, gen), "target");
  MseLoss<float> mse(*gpu);
  model.forward_with_loss(X, mse, target);
  const HostMatrix<float> output = to_host(*gpu, model.output());
  CHECK(output.minCoeff() >= 0.0f);  // the ReLU ran before the loss
  MseLoss<float> separate(*gpu);
  separate.compute(model.output(), target);
  CHECK(to_host(*gpu, mse.gradient()) == to_host(*gpu, separate.gradient()));
}
