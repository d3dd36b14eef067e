// The fused small-layer path (Backend::fused_lora_forward/backward) against the separate
// products, on the CPU and on CUDA: every output of a layer's forward and backward, shapes at
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
using relora::testing::takes_fused_forward;

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
  BackendOptions options;
  options.fused_small_layers = fused;
  auto backend = make_backend<float>(device, options);
  std::mt19937 gen(11);
  const HostMatrix<float> X = normal_matrix<float>(200, 10, gen);
  const HostMatrix<float> W_true = normal_matrix<float>(5, 10, gen);
  const HostMatrix<float> target = X * W_true.transpose();
  Model<float> model(backend);
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

// The CPU backward reads the forward's feature-major copies of X and U instead of transposing them
// again, but only while X and U still hold what was copied: after another layer's forward, or
// after X and U were rewritten through the backend, it must read them again.
TEST_CASE("fused small layer on the CPU: the backward never reads a stale copy of X or U") {
  auto backend = make_backend<double>(Device::cpu);
  std::mt19937 gen(5);
  const Index n = 37, k = 10, d = 5, r = 4;
  const double s = 0.5;
  const HostMatrix<double> W = normal_matrix<double>(d, k, gen), A = normal_matrix<double>(r, k, gen),
                           B = normal_matrix<double>(d, r, gen), G = normal_matrix<double>(n, d, gen);
  const HostMatrix<double> X0 = normal_matrix<double>(n, k, gen), X1 = normal_matrix<double>(n, k, gen);
  Tensor<double> tW = to_backend<double>(*backend, W, "W"), tA = to_backend<double>(*backend, A, "A"),
                 tB = to_backend<double>(*backend, B, "B"), dY = to_backend<double>(*backend, G, "dY");
  Tensor<double> X = to_backend<double>(*backend, X0, "X"), X_other = to_backend<double>(*backend, X1, "X other");
  Tensor<double> U = backend->allocate(n, r), Y = backend->allocate(n, d), U_other = backend->allocate(n, r),
                 Y_other = backend->allocate(n, d);
  Tensor<double> dU = backend->allocate(n, r), dA = backend->allocate(r, k), dB = backend->allocate(d, r);
  const LoraLayerTensors<double> layer{&X, &tW, &tA, &tB, nullptr, s};
  const LoraLayerTensors<double> other{&X_other, &tW, &tA, &tB, nullptr, s};
  const LoraLayerGradients<double> grads{&dU, &dA, &dB, nullptr, nullptr};
  auto check_gradients = [&](const HostMatrix<double>& X_now) {
    using relora::testing::host_of;
    const HostMatrix<double> dU_want = s * G * B;
    CHECK(relative_error(host_of(dA), HostMatrix<double>(dU_want.transpose() * X_now)) < 1e-13);
    CHECK(relative_error(host_of(dB), HostMatrix<double>(s * G.transpose() * X_now * A.transpose())) < 1e-13);
  };

  REQUIRE(backend->fused_lora_forward(layer, U, Y));
  REQUIRE(backend->fused_lora_forward(other, U_other, Y_other));
  REQUIRE(backend->fused_lora_backward(layer, U, dY, grads));
  check_gradients(X0);

  REQUIRE(backend->fused_lora_forward(layer, U, Y));
  backend->upload(X1.data(), X);  // X and U now hold what the other forward saw
  backend->copy(U_other, U);
  REQUIRE(backend->fused_lora_backward(layer, U, dY, grads));
  check_gradients(X1);
}

TEST_CASE("fused small layer: the CPU takes it for tiny layers only, and never when switched off") {
  auto cpu = make_backend<float>(Device::cpu);
  CHECK(takes_fused_forward(*cpu, {200, 10, 5, 4}));
  CHECK(takes_fused_forward(*cpu, {37, 16, 16, 8}));
  CHECK_FALSE(takes_fused_forward(*cpu, {37, 17, 16, 8}));  // k over the limit
  CHECK_FALSE(takes_fused_forward(*cpu, {37, 16, 16, 9}));  // rank over the limit
  CHECK_FALSE(takes_fused_forward(*cpu, {1 << 16, 16, 16, 8}));  // too much work for one core
  BackendOptions off;
  off.fused_small_layers = false;
  auto cpu_off = make_backend<float>(Device::cpu, off);
  CHECK_FALSE(takes_fused_forward(*cpu_off, {200, 10, 5, 4}));
}

// A forward and a backward with one tensor of the wrong shape: ShapeError naming it and the shapes.
template <typename T>
void check_bad_shapes(Backend<T>& backend) {
  Tensor<T> X = backend.allocate(20, 10), W = backend.allocate(5, 10), A = backend.allocate(4, 10),
            B = backend.allocate(5, 4), U = backend.allocate(20, 4), Y = backend.allocate(20, 5);
  Tensor<T> W_bad = backend.allocate(5, 9), Y_bad = backend.allocate(19, 5);
  Tensor<T> dU = backend.allocate(20, 4), dA = backend.allocate(4, 10), dB = backend.allocate(5, 4),
            dA_bad = backend.allocate(4, 11);
  auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const ShapeError& e) {
      return std::string(e.what());
    }
    return std::string("(no ShapeError)");
  };
  const std::string w = message([&] { backend.fused_lora_forward({&X, &W_bad, &A, &B, nullptr, T(1)}, U, Y); });
  CHECK(w.find("fused LoRA layer W") != std::string::npos);
  CHECK(w.find("[5 x 9]") != std::string::npos);
  const std::string y = message([&] { backend.fused_lora_forward({&X, &W, &A, &B, nullptr, T(1)}, U, Y_bad); });
  CHECK(y.find("fused_lora_forward") != std::string::npos);
  const std::string da = message([&] {
    backend.fused_lora_backward({&X, &W, &A, &B, nullptr, T(1)}, U, Y, {&dU, &dA_bad, &dB, nullptr, nullptr});
  });
  CHECK(da.find("fused_lora_backward dA") != std::string::npos);
  CHECK(da.find("[4 x 11]") != std::string::npos);
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
  REQUIRE(takes_fused_forward(*backend, s));
  std::mt19937 gen(99);
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 3.0, .bias = BiasMode::trainable};
  LoraLinear<double> layer(*backend, config, normal_matrix(s.d, s.k, gen));
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
  CHECK(takes_fused_forward(*gpu, {200, 10, 5, 4}));
  const std::vector<double> fused = train_losses(Device::cuda, true);
  const std::vector<double> cpu = train_losses(Device::cpu, false);
  for (std::size_t i = 0; i < fused.size(); ++i) {
    CAPTURE(i);
    CHECK(fused[i] == doctest::Approx(cpu[i]).epsilon(1e-4));
  }
}
