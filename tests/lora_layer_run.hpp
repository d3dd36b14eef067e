#pragma once
// One LoRA layer's forward and backward on a backend, everything it produced copied to the host,
// and the comparison of two such runs: how the fused small-layer path and the CUDA adapter passes
// are checked against the separate products.
#include <doctest/doctest.h>

#include <random>
#include <tuple>
#include <vector>

#include "gradient_check.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"

namespace relora::testing {

struct LayerShape {
  Index n, k, d, r;  // rows, in, out, rank
};

template <typename T>
struct LayerRun {
  HostMatrix<T> Y, dA, dB, db, dX;
};

// A layer with random W, A, B, b (drawn from the shape, so two backends get the same ones), one
// forward on a random X and one backward from a random dY.
template <typename T>
LayerRun<T> run_layer(Backend<T>& backend, const LayerShape& s, BiasMode bias, bool need_dX) {
  std::mt19937 gen(unsigned(s.n * 7919 + s.k * 131 + s.d * 17 + s.r));
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 2.5, .bias = bias, .seed = 3};
  LoraLinear<T> layer(backend, config, normal_matrix<T>(s.d, s.k, gen));
  layer.set_A(normal_matrix<T>(s.r, s.k, gen));
  layer.set_B(normal_matrix<T>(s.d, s.r, gen));
  if (bias != BiasMode::none) layer.set_b(normal_matrix<T>(1, s.d, gen));
  Tensor<T> X = to_backend<T>(backend, normal_matrix<T>(s.n, s.k, gen), "X");
  Tensor<T> dY = to_backend<T>(backend, normal_matrix<T>(s.n, s.d, gen), "dY");
  LayerRun<T> out;
  out.Y = to_host(backend, layer.forward(X));
  layer.backward(dY, need_dX);
  out.dA = to_host(backend, layer.dA());
  out.dB = to_host(backend, layer.dB());
  if (bias == BiasMode::trainable) out.db = to_host(backend, layer.db());
  if (need_dX) out.dX = to_host(backend, layer.dX());
  return out;
}

template <typename T>
void expect_same_layer(const LayerRun<T>& got, const LayerRun<T>& want, double tolerance) {
  auto close = [&](const HostMatrix<T>& a, const HostMatrix<T>& b, const char* name) {
    REQUIRE(a.rows() == b.rows());
    REQUIRE(a.cols() == b.cols());
    if (a.size() == 0) return;
    const double err = relative_error(a.template cast<double>(), b.template cast<double>());
    INFO(name << " relative error " << err);
    CHECK(err < tolerance);
  };
  close(got.Y, want.Y, "Y");
  close(got.dA, want.dA, "dA");
  close(got.dB, want.dB, "dB");
  close(got.db, want.db, "db");
  close(got.dX, want.dX, "dX");
}

// Every shape, with each bias mode, with and without dX, on `device` (its fused paths on) against
// the CPU's separate products.
template <typename T>
void compare_with_separate_products(Device device, const std::vector<LayerShape>& shapes, double tolerance) {
  BackendOptions separate_options;
  separate_options.fused_small_layers = false;
  auto separate = make_backend<T>(Device::cpu, separate_options);
  auto fused = make_backend<T>(device);
  for (const LayerShape& s : shapes) {
    for (BiasMode bias : {BiasMode::trainable, BiasMode::frozen, BiasMode::none}) {
      for (bool need_dX : {false, true}) {
        CAPTURE(s.n);
        CAPTURE(s.k);
        CAPTURE(s.d);
        CAPTURE(s.r);
        CAPTURE(int(bias));
        CAPTURE(need_dX);
        expect_same_layer(run_layer<T>(*fused, s, bias, need_dX), run_layer<T>(*separate, s, bias, need_dX),
                          tolerance);
      }
    }
  }
}

// What a step of a last layer trained on the MSE leaves on the host.
template <typename T>
struct LossRun {
  bool fused = false;
  double loss = 0;
  HostMatrix<T> Y, dY, dA, dB, db;
};

// A layer of shape s with parameters drawn from the shape (the same for every backend), its
// forward and MSE on a random batch, fused where `fuse` and the backend can, then its backward.
template <typename T>
LossRun<T> run_last_layer(Backend<T>& backend, const LayerShape& s, BiasMode bias, bool fuse) {
  std::mt19937 gen(unsigned(s.n * 31 + s.k * 7 + s.d * 3 + s.r));
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 2.5, .bias = bias, .seed = 4};
  LoraLinear<T> layer(backend, config, normal_matrix<T>(s.d, s.k, gen, 0.3));
  layer.set_A(normal_matrix<T>(s.r, s.k, gen, 0.3));
  layer.set_B(normal_matrix<T>(s.d, s.r, gen, 0.3));
  if (bias != BiasMode::none) layer.set_b(normal_matrix<T>(1, s.d, gen));
  Tensor<T> X = to_backend<T>(backend, normal_matrix<T>(s.n, s.k, gen), "X");
  Tensor<T> target = to_backend<T>(backend, normal_matrix<T>(s.n, s.d, gen), "target");
  MseLoss<T> mse(backend);
  LossRun<T> out;
  if (fuse) out.fused = layer.forward_with_mse(X, target, mse.gradient_buffer(target), mse.value_buffer());
  if (!out.fused) mse.forward_backward(layer.forward(X), target);
  out.Y = to_host(backend, layer.output());
  out.dY = to_host(backend, mse.gradient());
  out.loss = double(mse.value());
  layer.backward(mse.gradient(), /*need_dX=*/false);
  out.dA = to_host(backend, layer.dA());
  out.dB = to_host(backend, layer.dB());
  if (bias == BiasMode::trainable) out.db = to_host(backend, layer.db());
  return out;
}

// Two runs of run_last_layer within `tolerance`: the loss and every output, each relative to want's
// (`against` names want in the messages).
template <typename T>
void expect_close_loss_runs(const LossRun<T>& got, const LossRun<T>& want, double tolerance, const char* against) {
  CHECK(got.loss == doctest::Approx(want.loss).epsilon(tolerance));
  for (const auto& [g, w, name] : {std::tuple{&got.Y, &want.Y, "Y"}, std::tuple{&got.dY, &want.dY, "dY"},
                                   std::tuple{&got.dA, &want.dA, "dA"}, std::tuple{&got.dB, &want.dB, "dB"},
                                   std::tuple{&got.db, &want.db, "db"}}) {
    if (w->size() == 0) continue;
    const double err = relative_error(g->template cast<double>(), w->template cast<double>());
    INFO(name << " relative error against " << against << " " << err);
    CHECK(err < tolerance);
  }
}

// A last layer of shape s trained through forward_with_mse on `backend`, which must take its fused
// pass: dA, dB, db (and dX where asked) against central differences of the fused loss in double.
inline void check_fused_loss_gradients(Backend<double>& backend, const LayerShape& s, bool need_dX) {
  std::mt19937 gen(8);
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 3.0, .bias = BiasMode::trainable};
  LoraLinear<double> layer(backend, config, normal_matrix<double>(s.d, s.k, gen));
  layer.set_B(normal_matrix<double>(s.d, s.r, gen));
  layer.set_b(normal_matrix<double>(1, s.d, gen));
  Tensor<double> X = to_backend<double>(backend, normal_matrix<double>(s.n, s.k, gen), "X");
  Tensor<double> target = to_backend<double>(backend, normal_matrix<double>(s.n, s.d, gen), "target");
  MseLoss<double> mse(backend);
  Tensor<double>& dY = mse.gradient_buffer(target);
  auto loss = [&]() {
    REQUIRE(layer.forward_with_mse(X, target, dY, mse.value_buffer()));
    return mse.value();
  };
  loss();
  layer.backward(dY, need_dX);
  const HostMatrix<double> dA = to_host(backend, layer.dA()), dB = to_host(backend, layer.dB()),
                           db = to_host(backend, layer.db());
  auto numeric = [&](const Tensor<double>& t) { return numeric_gradient_on(backend, const_cast<Tensor<double>&>(t), loss); };
  CHECK(relative_error(dA, numeric(layer.A())) < 1e-7);
  CHECK(relative_error(dB, numeric(layer.B())) < 1e-7);
  CHECK(relative_error(db, numeric(layer.b())) < 1e-7);
  if (need_dX) {
    const HostMatrix<double> dX = to_host(backend, layer.dX());
    CHECK(relative_error(dX, numeric(X)) < 1e-7);
  }
}

// Whether `backend` takes its fused path for a layer of shape s (a forward on scratch tensors).
template <typename T>
bool takes_fused_forward(Backend<T>& backend, const LayerShape& s) {
  Tensor<T> X = backend.allocate(s.n, s.k), W = backend.allocate(s.d, s.k), A = backend.allocate(s.r, s.k),
            B = backend.allocate(s.d, s.r), U = backend.allocate(s.n, s.r), Y = backend.allocate(s.n, s.d);
  for (Tensor<T>* t : {&X, &W, &A, &B}) backend.fill(*t, T(0.5));
  const bool fused = backend.fused_lora_forward({&X, &W, &A, &B, nullptr, T(1)}, U, Y);
  backend.synchronize();
  return fused;
}

}  // namespace relora::testing
