// A tiny last layer with the MSE fused into its forward on the CPU (CpuBackend::fused_lora_forward_mse,
// cpu_fused_lora.cpp): the same values as the fused forward followed by the separate MSE, bit for
// bit where the operations are the same (Y, dY, dA, dB, db) and within rounding for the loss (its
// sum is split otherwise); the separate products' within rounding; gradients of the fused loss
// against central differences in double; and the panels of X and the target that the backend keeps
// from one step to the next, which must never be read once the tensors hold other values.
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "gradient_check.hpp"
#include "lora_layer_run.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"

using namespace relora;
using relora::testing::LossRun;
using relora::testing::normal_matrix;
using relora::testing::relative_error;
using relora::testing::run_last_layer;

namespace {

using Shape = relora::testing::LayerShape;

// The seed layer, a single row, partial SIMD registers (33, 37), widths of 1 and the CPU path's
// limits (16, 16, 8), and batches of two and three strips of 256 rows (the last one partial).
const std::vector<Shape>& cpu_output_shapes() {
  static const std::vector<Shape> shapes = {
      {200, 10, 5, 4}, {1, 3, 2, 1}, {33, 7, 9, 3}, {37, 16, 16, 8}, {5, 1, 1, 1}, {300, 12, 7, 3}, {513, 4, 3, 2},
  };
  return shapes;
}

template <typename T>
void check_cpu_fused_mse(double rounding, double separate_tolerance) {
  auto fused = make_backend<T>(Device::cpu);
  BackendOptions separate_options;
  separate_options.fused_small_layers = false;
  auto separate = make_backend<T>(Device::cpu, separate_options);
  for (const Shape& s : cpu_output_shapes()) {
    for (BiasMode bias : {BiasMode::trainable, BiasMode::frozen, BiasMode::none}) {
      CAPTURE(s.n);
      CAPTURE(s.k);
      CAPTURE(s.d);
      CAPTURE(s.r);
      CAPTURE(int(bias));
      const LossRun<T> with_mse = run_last_layer<T>(*fused, s, bias, true);
      const LossRun<T> then_mse = run_last_layer<T>(*fused, s, bias, false);  // fused forward, separate MSE
      const LossRun<T> products = run_last_layer<T>(*separate, s, bias, false);
      REQUIRE(with_mse.fused);
      CHECK_FALSE(then_mse.fused);
      CHECK(with_mse.Y == then_mse.Y);
      CHECK(with_mse.dY == then_mse.dY);
      CHECK(with_mse.dA == then_mse.dA);
      CHECK(with_mse.dB == then_mse.dB);
      CHECK(with_mse.db == then_mse.db);
      CHECK(with_mse.loss == doctest::Approx(then_mse.loss).epsilon(rounding));
      relora::testing::expect_close_loss_runs(with_mse, products, separate_tolerance, "the separate products");
    }
  }
}

// One layer trained on the MSE through forward_with_mse: what a step leaves, for comparing runs.
struct Step {
  HostMatrix<double> Y, dY, dA, dB;
  double loss;
};

Step mse_step(Backend<double>& backend, LoraLinear<double>& layer, const Tensor<double>& X,
              const Tensor<double>& target) {
  MseLoss<double> mse(backend);
  REQUIRE(layer.forward_with_mse(X, target, mse.gradient_buffer(target), mse.value_buffer()));
  layer.backward(mse.gradient(), /*need_dX=*/false);
  using relora::testing::host_of;
  return {host_of(layer.output()), host_of(mse.gradient()), host_of(layer.dA()), host_of(layer.dB()), mse.value()};
}

void check_same_step(const Step& got, const Step& want) {
  CHECK(got.Y == want.Y);
  CHECK(got.dY == want.dY);
  CHECK(got.dA == want.dA);
  CHECK(got.dB == want.dB);
  CHECK(got.loss == want.loss);
}

}  // namespace

TEST_CASE("cpu fused output layer: the fused forward and separate MSE's bits, the separate products' within rounding") {
  check_cpu_fused_mse<float>(1e-6, 2e-6);
  check_cpu_fused_mse<double>(1e-14, 1e-13);
}

TEST_CASE("cpu fused output layer: gradients of the fused loss match finite differences in double") {
  auto backend = make_backend<double>(Device::cpu);
  relora::testing::check_fused_loss_gradients(*backend, {37, 10, 5, 4}, /*need_dX=*/true);
}

// The backend keeps X's and the target's feature-major panels between steps and reuses them while
// the tensors hold the values they were made from. A step after the batch or the target changed,
// through the backend or through the host pointer, must equal the same step on a fresh backend.
TEST_CASE("cpu fused output layer: a batch or target rewritten between steps is read again") {
  std::mt19937 gen(21);
  const Shape s{300, 10, 5, 4};  // two strips
  const HostMatrix<double> W = normal_matrix<double>(s.d, s.k, gen), A = normal_matrix<double>(s.r, s.k, gen),
                           B = normal_matrix<double>(s.d, s.r, gen);
  const HostMatrix<double> X0 = normal_matrix<double>(s.n, s.k, gen), X1 = normal_matrix<double>(s.n, s.k, gen);
  const HostMatrix<double> T0 = normal_matrix<double>(s.n, s.d, gen), T1 = normal_matrix<double>(s.n, s.d, gen);
  const LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 2.0};
  auto fresh_step = [&](const HostMatrix<double>& X_now, const HostMatrix<double>& target_now) {
    auto backend = make_backend<double>(Device::cpu);
    LoraLinear<double> layer(*backend, config, W);
    layer.set_A(A);
    layer.set_B(B);
    Tensor<double> X = to_backend<double>(*backend, X_now, "X"), target = to_backend<double>(*backend, target_now, "t");
    return mse_step(*backend, layer, X, target);
  };

  auto backend = make_backend<double>(Device::cpu);
  LoraLinear<double> layer(*backend, config, W);
  layer.set_A(A);
  layer.set_B(B);
  Tensor<double> X = to_backend<double>(*backend, X0, "X"), target = to_backend<double>(*backend, T0, "target");
  check_same_step(mse_step(*backend, layer, X, target), fresh_step(X0, T0));
  check_same_step(mse_step(*backend, layer, X, target), fresh_step(X0, T0));  // both panels reused

  Eigen::Map<HostMatrix<double>>(X.data(), s.n, s.k) = X1;  // through the host pointer, unseen by the backend
  check_same_step(mse_step(*backend, layer, X, target), fresh_step(X1, T0));
  X.data()[s.n * s.k - 1] += 1;  // the last element alone
  HostMatrix<double> X2 = X1;
  X2(s.n - 1, s.k - 1) += 1;
  check_same_step(mse_step(*backend, layer, X, target), fresh_step(X2, T0));

  Eigen::Map<HostMatrix<double>>(target.data(), s.n, s.d) = T1;
  check_same_step(mse_step(*backend, layer, X, target), fresh_step(X2, T1));
  backend->upload(X0.data(), X);  // through the backend
  backend->upload(T0.data(), target);
  check_same_step(mse_step(*backend, layer, X, target), fresh_step(X0, T0));

  // Another batch of the same shape in another tensor: its own panel, not the kept one.
  Tensor<double> X_other = to_backend<double>(*backend, X1, "X other");
  check_same_step(mse_step(*backend, layer, X_other, target), fresh_step(X1, T0));
  check_same_step(mse_step(*backend, layer, X, target), fresh_step(X0, T0));
}
