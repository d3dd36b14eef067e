// The tiny-layer siblings of LoraLinear (CpuTinyLoraLinear, CudaTinyLoraLinear) against the
// reference LoraLinear, on the CPU and on CUDA: every output of a layer's forward and backward, shapes at
// and around the fused path's edges (a partial chunk of rows, widths that are not whole SIMD
// packets, the width limits), with and without bias and dX; and whole training runs.
#include <doctest/doctest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "gradient_check.hpp"
#include "lora_layer_run.hpp"
#include "test_data.hpp"
#include "test_support.hpp"
#include "relora/relora.hpp"

using namespace relora;
using relora::testing::normal_matrix;
using relora::testing::relative_error;
using relora::testing::implementation_for;

namespace {

using Shape = relora::testing::LayerShape;

// The seed layer, a single row, partial chunks (33, 37), widths of 1 and of odd sizes, the CPU
// path's width limits (16, 16, 8) and the CUDA path's (32, 32, 32).
const std::vector<Shape>& fused_shapes() {
  static const std::vector<Shape> shapes = {
      {200, 10, 5, 4}, {1, 3, 2, 1}, {33, 7, 9, 3}, {37, 16, 16, 8}, {5, 1, 1, 1}, {64, 13, 6, 5}, {40, 32, 32, 32},
  };
  return shapes;
}

template <typename T>
void compare_backends(Device fused_device, double tolerance) {
  relora::testing::compare_with_separate_products<T>(fused_device, fused_shapes(), tolerance);
}

// Final losses of a seed-demo-like ReLoRA run (restarts, Adam resets, re-warmup).
std::vector<double> train_losses(Device device, bool fused) {
  auto backend = make_backend<float>(device);
  std::mt19937 gen(11);
  const HostMatrix<float> X = normal_matrix<float>(200, 10, gen);
  const HostMatrix<float> W_true = normal_matrix<float>(5, 10, gen);
  const HostMatrix<float> target = X * W_true.transpose();
  Model<float> model(backend, fused ? LayerChoice::fastest : LayerChoice::reference);
  model.add(LoraConfig{.in_features = 10, .out_features = 5, .rank = 4, .alpha = 8, .seed = 5}, Activation::identity,
            normal_matrix<float>(5, 10, gen, 0.1));
  TrainerConfig config;
  config.method = TrainingMethod::relora;
  config.relora.restart_every = 20;
  config.relora.restart_warmup_steps = 3;
  config.adam.lr = 1e-2;
  Trainer<float> trainer(model, config);
  Tensor<float> x = to_backend<float>(*backend, X, "X"), t = to_backend<float>(*backend, target, "target");
  std::vector<double> losses;
  for (int step = 0; step < 100; ++step) {
    trainer.step(x, t);
    if (step % 10 == 9) losses.push_back(trainer.loss());
  }
  return losses;
}

}  // namespace

TEST_CASE("fused small layer on the CPU: same outputs and gradients as the separate products") {
  compare_backends<float>(Device::cpu, 2e-6);
  compare_backends<double>(Device::cpu, 1e-13);
}

// The CPU backward reads its forward's feature-major copies of X and U instead of transposing them
// again. Each layer keeps its own: two layers alternating on two batches each read their own, and a
// batch rewritten between steps (through the backend or its host pointer) is read again.
TEST_CASE("fused small layer on the CPU: the backward reads the copies of its own forward's X and U") {
  auto backend = make_backend<double>(Device::cpu);
  std::mt19937 gen(5);
  const Index n = 37, k = 10, d = 5, r = 4;
  const LoraConfig config{.in_features = k, .out_features = d, .rank = r, .alpha = 2.0};
  const HostMatrix<double> W = normal_matrix<double>(d, k, gen), A = normal_matrix<double>(r, k, gen),
                           B = normal_matrix<double>(d, r, gen), G = normal_matrix<double>(n, d, gen);
  const HostMatrix<double> X0 = normal_matrix<double>(n, k, gen), X1 = normal_matrix<double>(n, k, gen);
  const double s = 0.5;
  auto make = [&]() {
    auto layer = make_lora_linear<double>(*backend, config, W);
    REQUIRE(std::string(layer->implementation()) == "cpu_tiny");
    layer->set_A(A);
    layer->set_B(B);
    return layer;
  };
  auto layer = make(), other = make();
  Tensor<double> X = to_backend<double>(*backend, X0, "X"), X_other = to_backend<double>(*backend, X1, "X other");
  Tensor<double> dY = to_backend<double>(*backend, G, "dY");
  auto check_gradients = [&](const LoraLinear<double>& l, const HostMatrix<double>& X_now) {
    using relora::testing::host_of;
    const HostMatrix<double> dU_want = s * G * B;
    CHECK(relative_error(host_of(l.dA()), HostMatrix<double>(dU_want.transpose() * X_now)) < 1e-13);
    CHECK(relative_error(host_of(l.dB()), HostMatrix<double>(s * G.transpose() * X_now * A.transpose())) < 1e-13);
  };
  layer->forward(X);
  other->forward(X_other);
  layer->backward(dY, false);
  other->backward(dY, false);
  check_gradients(*layer, X0);
  check_gradients(*other, X1);

  backend->upload(X1.data(), X);  // through the backend, between steps
  layer->forward(X);
  layer->backward(dY, false);
  check_gradients(*layer, X1);
  Eigen::Map<HostMatrix<double>>(X.data(), n, k) = X0;  // through the host pointer
  layer->forward(X);
  layer->backward(dY, false);
  check_gradients(*layer, X0);
}

TEST_CASE("fused small layer: the CPU takes it for tiny layers only, and never for the reference choice") {
  auto cpu = make_backend<float>(Device::cpu);
  CHECK(implementation_for(*cpu, {200, 10, 5, 4}) == "cpu_tiny");
  CHECK(implementation_for(*cpu, {37, 16, 16, 8}) == "cpu_tiny");
  CHECK(implementation_for(*cpu, {37, 17, 16, 8}) == "reference");  // k over the limit
  CHECK(implementation_for(*cpu, {37, 16, 16, 9}) == "reference");  // rank over the limit
  CHECK(implementation_for(*cpu, {1 << 16, 16, 16, 8}) == "reference");  // too much work for one core
  const LoraConfig tiny{.in_features = 10, .out_features = 5, .rank = 4};
  CHECK(std::string(make_lora_linear<float>(*cpu, tiny, LayerChoice::reference)->implementation()) == "reference");
}

// Bad shapes reach a sibling's own checks before any kernel: ShapeError naming the tensor and the shapes.
template <typename T>
void check_bad_shapes(Backend<T>& backend) {
  const auto layer = make_lora_linear<T>(backend, LoraConfig{.in_features = 10, .out_features = 5, .rank = 4});
  REQUIRE(std::string(layer->implementation()) != "reference");
  Tensor<T> X = backend.allocate(20, 10), X_bad = backend.allocate(20, 9), dY_bad = backend.allocate(19, 5),
            dX_bad = backend.allocate(20, 11), target_bad = backend.allocate(20, 4);
  backend.fill(X, T(0.5));
  auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const ShapeError& e) {
      return std::string(e.what());
    }
    return std::string("no ShapeError");
  };
  const std::string x = message([&] { layer->forward(X_bad); });
  CHECK(x.find("[20 x 9]") != std::string::npos);
  MseLoss<T> mse(backend);
  const std::string t = message([&] { layer->forward_with_loss(X, mse, target_bad); });
  CHECK(t.find("[20 x 4]") != std::string::npos);
  layer->forward(X);
  const std::string dy = message([&] { layer->backward(dY_bad, nullptr); });
  CHECK(dy.find("dY") != std::string::npos);
  CHECK(dy.find("[19 x 5]") != std::string::npos);
  Tensor<T> dY = backend.allocate(20, 5);
  backend.fill(dY, T(1));
  const std::string dx = message([&] { layer->backward(dY, &dX_bad); });
  CHECK(dx.find("dX") != std::string::npos);
  CHECK(dx.find("[20 x 11]") != std::string::npos);
}

TEST_CASE("fused small layer: inconsistent shapes throw ShapeError naming the tensor and the shapes") {
  check_bad_shapes(*make_backend<float>(Device::cpu));
  if (relora::testing::cuda_or_skip("cuda fused small layer shapes")) check_bad_shapes(*make_backend<float>(Device::cuda));
}

TEST_CASE("fused small layer: gradients match finite differences through the fused path") {
  // test_lora_linear checks many small shapes this way; this one asserts that the fused path is
  // the one being checked.
  auto backend = make_backend<double>(Device::cpu);
  const Shape s{37, 10, 5, 4};
  std::mt19937 gen(99);
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 3.0, .bias = BiasMode::trainable};
  const auto made = make_lora_linear<double>(*backend, config, normal_matrix(s.d, s.k, gen));
  LoraLinear<double>& layer = *made;
  REQUIRE(std::string(layer.implementation()) == "cpu_tiny");
  layer.set_B(normal_matrix(s.d, s.r, gen));
  layer.set_b(normal_matrix(1, s.d, gen));
  Tensor<double> X = to_backend<double>(*backend, normal_matrix(s.n, s.k, gen), "X");
  const HostMatrix<double> G = normal_matrix(s.n, s.d, gen);
  auto loss = [&]() { return relora::testing::host_of(layer.forward(X)).cwiseProduct(G).sum(); };
  loss();
  Tensor<double> dY = to_backend<double>(*backend, G, "dY");
  layer.backward(dY, /*need_dX=*/true);
  using relora::testing::host_of;
  using relora::testing::numeric_gradient;
  CHECK(relative_error(host_of(layer.dA()), numeric_gradient(const_cast<Tensor<double>&>(layer.A()), loss)) < 1e-7);
  CHECK(relative_error(host_of(layer.dB()), numeric_gradient(const_cast<Tensor<double>&>(layer.B()), loss)) < 1e-7);
  CHECK(relative_error(host_of(layer.db()), numeric_gradient(const_cast<Tensor<double>&>(layer.b()), loss)) < 1e-7);
  CHECK(relative_error(host_of(layer.dX()), numeric_gradient(X, loss)) < 1e-7);
}

TEST_CASE("fused small layer: a ReLoRA run trains to the same losses fused and unfused") {
  const std::vector<double> fused = train_losses(Device::cpu, true);
  const std::vector<double> separate = train_losses(Device::cpu, false);
  REQUIRE(fused.size() == separate.size());
  for (std::size_t i = 0; i < fused.size(); ++i) {
    CAPTURE(i);
    CHECK(fused[i] == doctest::Approx(separate[i]).epsilon(1e-4));
  }
  CHECK(fused.back() < 0.5 * fused.front());  // it trains
}

TEST_CASE("cuda: fused small layer matches the CPU's separate products") {
  if (!relora::testing::cuda_or_skip("cuda fused small layer")) return;
  compare_backends<float>(Device::cuda, 2e-6);
  compare_backends<double>(Device::cuda, 1e-13);
  auto gpu = make_backend<float>(Device::cuda);
  CHECK(implementation_for(*gpu, {200, 10, 5, 4}) == "cuda_tiny");
  const std::vector<double> fused = train_losses(Device::cuda, true);
  const std::vector<double> cpu = train_losses(Device::cpu, false);
  for (std::size_t i = 0; i < fused.size(); ++i) {
    CAPTURE(i);
    CHECK(fused[i] == doctest::Approx(cpu[i]).epsilon(1e-4));
  }
}
