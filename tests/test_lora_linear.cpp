// LoraLinear's analytic gradients against central finite differences in double precision,
// over many shapes, with and without dropout and bias; fresh-adapter, merge and unmerge
// properties in float.
#include <doctest/doctest.h>

#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gradient_check.hpp"
#include "test_data.hpp"
#include "test_support.hpp"
#include "relora/relora.hpp"

using namespace relora;
using relora::testing::host_of;
using relora::testing::normal_matrix;
using relora::testing::numeric_gradient;
using relora::testing::relative_error;

namespace {

struct Shape {
  Index n, k, d, r;
};

std::vector<Shape> gradient_shapes() {
  std::vector<Shape> shapes = {
      {1, 3, 2, 1},   // n = 1, rank 1
      {5, 4, 4, 4},   // square, rank = min(k, d)
      {7, 6, 3, 3},   // rank = d < k
      {4, 3, 8, 3},   // rank = k < d
      {1, 10, 5, 4},  // the seed layer, one row
      {9, 5, 7, 1},
  };
  std::mt19937 gen(2024);
  for (int i = 0; i < 10; ++i) {
    const Index n = 1 + gen() % 8, k = 1 + gen() % 9, d = 1 + gen() % 9;
    const Index r = 1 + gen() % std::min(k, d);
    shapes.push_back({n, k, d, r});
  }
  return shapes;
}

// Checks every gradient of one layer for L = sum(Y .* G), whose dL/dY is G.
void check_layer_gradients(const Shape& s, double dropout, BiasMode bias, bool rslora, TrainTarget target) {
  CAPTURE(s.n);
  CAPTURE(s.k);
  CAPTURE(s.d);
  CAPTURE(s.r);
  CAPTURE(dropout);
  CAPTURE(int(bias));
  CAPTURE(rslora);
  CAPTURE(int(target));
  auto backend = make_backend<double>(Device::cpu);
  std::mt19937 gen(unsigned(s.n * 1000 + s.k * 100 + s.d * 10 + s.r));
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 3.0, .rslora = rslora,
                    .dropout = dropout, .bias = bias, .seed = 7};
  LoraLinear<double> layer(*backend, config, normal_matrix(s.d, s.k, gen));
  layer.set_B(normal_matrix(s.d, s.r, gen));  // B = 0 would make dA vanish and hide a wrong formula
  if (bias != BiasMode::none) layer.set_b(normal_matrix(1, s.d, gen));
  layer.set_train_target(target);
  Tensor<double> X = to_backend<double>(*backend, normal_matrix(s.n, s.k, gen), "X");
  const HostMatrix<double> G = normal_matrix(s.n, s.d, gen);

  const std::uint64_t stream = layer.rng_stream();
  auto loss = [&]() {
    layer.set_rng_stream(stream);  // the same dropout mask at every evaluation
    return host_of(layer.forward(X)).cwiseProduct(G).sum();
  };
  loss();
  Tensor<double> dY = to_backend<double>(*backend, G, "dY");
  layer.backward(dY, /*need_dX=*/true);

  auto expect_close = [](const HostMatrix<double>& analytic, const HostMatrix<double>& numeric, const char* name) {
    const double err = relative_error(analytic, numeric);
    INFO(name << " max relative error " << err);
    CHECK(err < 1e-6);
  };
  if (target == TrainTarget::adapter) {
    expect_close(host_of(layer.dA()), numeric_gradient(const_cast<Tensor<double>&>(layer.A()), loss), "dA");
    expect_close(host_of(layer.dB()), numeric_gradient(const_cast<Tensor<double>&>(layer.B()), loss), "dB");
  } else {
    expect_close(host_of(layer.dW()), numeric_gradient(const_cast<Tensor<double>&>(layer.W()), loss), "dW");
  }
  if (bias == BiasMode::trainable) {
    expect_close(host_of(layer.db()), numeric_gradient(const_cast<Tensor<double>&>(layer.b()), loss), "db");
  }
  expect_close(host_of(layer.dX()), numeric_gradient(X, loss), "dX");
}

}  // namespace

TEST_CASE("LoraLinear gradients match finite differences over many shapes, no dropout") {
  for (const Shape& s : gradient_shapes()) {
    check_layer_gradients(s, 0.0, BiasMode::trainable, false, TrainTarget::adapter);
  }
}

TEST_CASE("LoraLinear gradients match finite differences with dropout (fixed mask)") {
  for (const Shape& s : gradient_shapes()) {
    check_layer_gradients(s, 0.4, BiasMode::trainable, false, TrainTarget::adapter);
  }
}

TEST_CASE("LoraLinear gradients match finite differences with rsLoRA and a frozen or no bias") {
  for (const Shape& s : gradient_shapes()) {
    check_layer_gradients(s, 0.0, BiasMode::frozen, true, TrainTarget::adapter);
    check_layer_gradients(s, 0.2, BiasMode::none, true, TrainTarget::adapter);
  }
}

TEST_CASE("LoraLinear base-weight gradient (full fine-tuning) matches finite differences") {
  for (const Shape& s : gradient_shapes()) {
    check_layer_gradients(s, 0.0, BiasMode::trainable, false, TrainTarget::base);
    check_layer_gradients(s, 0.3, BiasMode::none, false, TrainTarget::base);
  }
}

TEST_CASE("dropout mask is inverted dropout: zeros with probability p, else 1 / (1 - p)") {
  auto backend = make_backend<double>(Device::cpu);
  LoraConfig config{.in_features = 200, .out_features = 3, .rank = 2, .dropout = 0.25};
  LoraLinear<double> layer(*backend, config);
  std::mt19937 gen(3);
  Tensor<double> X = to_backend<double>(*backend, normal_matrix(100, 200, gen), "X");
  layer.forward(X);
  const HostMatrix<double> mask = host_of(layer.dropout_mask());
  const double zeros = double((mask.array() == 0).count()) / double(mask.size());
  CHECK((mask.array() == 0 || (mask.array() - 1 / 0.75).abs() < 1e-12).all());
  CHECK(zeros == doctest::Approx(0.25).epsilon(0.05));
  // A second step draws a new mask; evaluation mode applies none.
  layer.forward(X);
  CHECK((host_of(layer.dropout_mask()) - mask).norm() > 0);
  layer.set_training(false);
  layer.set_B(normal_matrix(3, 2, gen));
  const HostMatrix<double> eval_out = host_of(layer.forward(X));
  const HostMatrix<double> expected = host_of(X) * host_of(layer.W()).transpose() +
                                      layer.scale() * host_of(X) * host_of(layer.A()).transpose() *
                                          host_of(layer.B()).transpose();
  CHECK(relative_error(eval_out, expected) < 1e-12);
}

TEST_CASE("forward matches the naive formula X W^T + b + s X A^T B^T") {
  auto backend = make_backend<double>(Device::cpu);
  std::mt19937 gen(11);
  for (bool rslora : {false, true}) {
    LoraConfig config{.in_features = 6, .out_features = 4, .rank = 3, .alpha = 5, .rslora = rslora,
                      .bias = BiasMode::frozen};
    LoraLinear<double> layer(*backend, config, normal_matrix(4, 6, gen));
    layer.set_b(normal_matrix(4, 1, gen));
    layer.set_B(normal_matrix(4, 3, gen));
    const double s = rslora ? 5 / std::sqrt(3.0) : 5 / 3.0;
    CHECK(layer.scale() == doctest::Approx(s));
    const HostMatrix<double> x = normal_matrix(5, 6, gen);
    Tensor<double> X = to_backend<double>(*backend, x, "X");
    HostMatrix<double> expected = x * host_of(layer.W()).transpose() +
                                  s * x * host_of(layer.A()).transpose() * host_of(layer.B()).transpose();
    expected.rowwise() += host_of(layer.b()).row(0);
    CHECK(relative_error(host_of(layer.forward(X)), expected) < 1e-13);
  }
}

TEST_CASE("A fresh adapter leaves the output unchanged; A follows the configured init") {
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937 gen(5);
  const HostMatrix<float> W = normal_matrix(16, 32, gen).cast<float>();
  const HostMatrix<float> x = normal_matrix(8, 32, gen).cast<float>();
  for (LoraInit init : {LoraInit::kaiming_uniform, LoraInit::gaussian}) {
    LoraConfig config{.in_features = 32, .out_features = 16, .rank = 8, .init = init, .init_std = 0.5};
    LoraLinear<float> layer(*backend, config, W);
    Tensor<float> X = to_backend<float>(*backend, x, "X");
    const HostMatrix<float> out = to_host(*backend, layer.forward(X));
    const HostMatrix<float> base = x * W.transpose();
    CHECK((out - base).cwiseAbs().maxCoeff() == 0.0f);
    CHECK(to_host(*backend, layer.B()).cwiseAbs().maxCoeff() == 0.0f);
    const HostMatrix<float> A = to_host(*backend, layer.A());
    if (init == LoraInit::kaiming_uniform) {
      CHECK(A.cwiseAbs().maxCoeff() <= 1 / std::sqrt(32.0f));
      CHECK(A.cwiseAbs().maxCoeff() > 0.8f / std::sqrt(32.0f));
    } else {
      const double stddev = std::sqrt(double(A.squaredNorm()) / double(A.size()));
      CHECK(stddev == doctest::Approx(0.5).epsilon(0.15));
    }
  }
}

TEST_CASE("merge gives the unmerged output, and merge then unmerge gives back the original (float)") {
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937 gen(9);
  for (Shape s : {Shape{64, 48, 40, 8}, Shape{10, 10, 5, 4}, Shape{3, 7, 9, 7}}) {
    CAPTURE(s.k);
    LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 16, .bias = BiasMode::frozen};
    const HostMatrix<float> W = normal_matrix(s.d, s.k, gen).cast<float>();
    LoraLinear<float> layer(*backend, config, W);
    layer.set_b(normal_matrix(1, s.d, gen).cast<float>());
    layer.set_B(normal_matrix(s.d, s.r, gen).cast<float>());
    Tensor<float> X = to_backend<float>(*backend, normal_matrix(s.n, s.k, gen).cast<float>(), "X");
    const HostMatrix<float> unmerged = to_host(*backend, layer.forward(X));
    layer.merge();
    const HostMatrix<float> merged = to_host(*backend, layer.forward(X));
    const double merged_err = relative_error(merged, unmerged);
    INFO("merged vs unmerged relative error " << merged_err);
    CHECK(merged_err < 1e-6);
    layer.unmerge();
    const HostMatrix<float> restored = to_host(*backend, layer.forward(X));
    const double round_trip_err = relative_error(restored, unmerged);
    const double weight_err = relative_error(to_host(*backend, layer.W()), W);
    INFO("round trip output error " << round_trip_err << ", weight error " << weight_err);
    CHECK(round_trip_err < 1e-6);
    CHECK(weight_err < 1e-6);
  }
}

// Safe merge (as PEFT's safe_merge): W + s B A is checked before W changes. A NaN in the adapter,
// or finite factors whose product overflows, are refused with the layer named and W bit for bit
// as it was; finite sums beyond the quick bound are checked exactly and merged.
TEST_CASE("merge refuses an adapter that would put NaN or Inf into W, and leaves W unchanged") {
  std::mt19937 gen(17);
  for (Device device : {Device::cpu, Device::cuda}) {
    if (device == Device::cuda && !relora::testing::cuda_or_skip("cuda safe merge")) continue;
    auto backend = make_backend<float>(device);
    const LoraConfig config{.in_features = 6, .out_features = 4, .rank = 2, .alpha = 2};  // s = 1
    const HostMatrix<float> W = normal_matrix<float>(4, 6, gen);
    for (const auto layer_choice : {LayerChoice::fastest, LayerChoice::reference}) {
      auto layer = make_lora_linear<float>(*backend, config, W, layer_choice);
      auto refused = [&](const char* what) {
        CAPTURE(what);
        try {
          layer->merge();
          FAIL("the merge was taken");
        } catch (const ConfigError& e) {
          const std::string message = e.what();
          CHECK(message.find("6 -> 4") != std::string::npos);
          CHECK(message.find("merge refused") != std::string::npos);
        }
        CHECK_FALSE(layer->merged());
        CHECK(to_host(*backend, layer->W()) == W);
      };
      backend->fill(const_cast<Tensor<float>&>(layer->B()), std::numeric_limits<float>::quiet_NaN());
      refused("NaN in B");
      backend->fill(const_cast<Tensor<float>&>(layer->B()), 3e19f);  // finite, but s B A is about 1e39 or more
      backend->fill(const_cast<Tensor<float>&>(layer->A()), 3e19f);
      refused("overflow");
      // Beyond the quick bound (2 x 1.5e19^2 = 4.5e38 > max / 2) but every sum finite (1.5e19^2 = 2.25e38
      // once, with B's second column zero): checked exactly, and merged.
      HostMatrix<float> A = HostMatrix<float>::Constant(2, 6, 1.5e19f), B = HostMatrix<float>::Zero(4, 2);
      B.col(0).setConstant(1.5e19f);
      layer->set_A(A);
      layer->set_B(B);
      layer->merge();
      CHECK(layer->merged());
      const HostMatrix<float> merged = to_host(*backend, layer->W());
      CHECK(merged.allFinite());
      CHECK(merged(0, 0) == doctest::Approx(W(0, 0) + 2.25e38f).epsilon(1e-6));
    }
  }
}

// The merge check's reduction: the largest magnitude, and +Inf when any entry is NaN or Inf, on
// tensors small enough for one pass and large enough to be split over threads.
TEST_CASE("Backend::max_abs: the largest magnitude, +Inf for a NaN or Inf anywhere") {
  std::mt19937 gen(23);
  for (Device device : {Device::cpu, Device::cuda}) {
    if (device == Device::cuda && !relora::testing::cuda_or_skip("cuda max_abs")) continue;
    auto backend = make_backend<float>(device);
    for (Index cols : {Index(7), Index(300000), Index(3000000)}) {
      CAPTURE(cols);
      HostMatrix<float> host = normal_matrix<float>(2, cols, gen);
      host(1, cols - 3) = -1e6f;  // the largest, negative, late in the tensor
      Tensor<float> x = to_backend<float>(*backend, host, "x");
      CHECK(backend->max_abs(x) == 1e6f);
      // A bad entry first, in the middle or last: on CUDA in the first, a middle or the last
      // block's share of a many-block reduction.
      for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
        for (Index at : {Index(0), cols, 2 * cols - 1}) {
          CAPTURE(at);
          HostMatrix<float> with_bad = host;
          with_bad.data()[at] = bad;
          backend->upload(with_bad.data(), x);
          CHECK(backend->max_abs(x) == std::numeric_limits<float>::infinity());
        }
      }
      backend->upload(host.data(), x);
      CHECK(backend->max_abs(x) == 1e6f);
    }
    Tensor<float> empty = backend->allocate(0, 3);
    CHECK(backend->max_abs(empty) == 0.0f);
  }
}
