#pragma once
// One LoRA layer's forward and backward on a backend, everything it produced copied to the host,
// and the comparison of two such runs: how the fast siblings of LoraLinear (make_lora_linear's
// picks) are checked against the reference LoraLinear.
#include <doctest/doctest.h>

#include <random>
#include <string>
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
LayerRun<T> run_layer(Backend<T>& backend, const LayerShape& s, BiasMode bias, bool need_dX, LayerChoice choice) {
  std::mt19937 gen(unsigned(s.n * 7919 + s.k * 131 + s.d * 17 + s.r));
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 2.5, .bias = bias, .seed = 3};
  const auto made = make_lora_linear<T>(backend, config, normal_matrix<T>(s.d, s.k, gen), choice);
  LoraLinear<T>& layer = *made;
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

// Every shape, with each bias mode, with and without dX, on `device` (its fastest layers) against
// the reference LoraLinear on the CPU.
template <typename T>
void compare_with_separate_products(Device device, const std::vector<LayerShape>& shapes, double tolerance) {
  auto separate = make_backend<T>(Device::cpu);
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
        expect_same_layer(run_layer<T>(*fused, s, bias, need_dX, LayerChoice::fastest),
                          run_layer<T>(*separate, s, bias, need_dX, LayerChoice::reference), tolerance);
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

// A layer of shape s (the implementation `choice` picks) with parameters drawn from the shape (the
// same for every backend), its forward and MSE on a random batch, then its backward. The MSE is
// computed by the layer (Layer::forward_with_loss, where a sibling may fuse it) when
// `loss_in_layer`, else separately after the forward; `fused` says whether a fast sibling ran.
template <typename T>
LossRun<T> run_last_layer(Backend<T>& backend, const LayerShape& s, BiasMode bias, LayerChoice choice,
                          bool loss_in_layer) {
  std::mt19937 gen(unsigned(s.n * 31 + s.k * 7 + s.d * 3 + s.r));
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 2.5, .bias = bias, .seed = 4};
  const auto made = make_lora_linear<T>(backend, config, normal_matrix<T>(s.d, s.k, gen, 0.3), choice);
  LoraLinear<T>& layer = *made;
  layer.set_A(normal_matrix<T>(s.r, s.k, gen, 0.3));
  layer.set_B(normal_matrix<T>(s.d, s.r, gen, 0.3));
  if (bias != BiasMode::none) layer.set_b(normal_matrix<T>(1, s.d, gen));
  Tensor<T> X = to_backend<T>(backend, normal_matrix<T>(s.n, s.k, gen), "X");
  Tensor<T> target = to_backend<T>(backend, normal_matrix<T>(s.n, s.d, gen), "target");
  MseLoss<T> mse(backend);
  LossRun<T> out;
  out.fused = std::string(layer.implementation()) != "reference";
  if (loss_in_layer) {
    layer.forward_with_loss(X, mse, target);
  } else {
    mse.compute(layer.forward(X), target);
  }
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

// A last layer of shape s (the fastest implementation, which must be a fast sibling) trained through
// forward_with_loss: dA, dB, db (and dX where asked) against central differences of the loss it
// computes, in double.
inline void check_fused_loss_gradients(Backend<double>& backend, const LayerShape& s, bool need_dX) {
  std::mt19937 gen(8);
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 3.0, .bias = BiasMode::trainable};
  const auto made = make_lora_linear<double>(backend, config, normal_matrix<double>(s.d, s.k, gen));
  LoraLinear<double>& layer = *made;
  REQUIRE(std::string(layer.implementation()) != "reference");
  layer.set_B(normal_matrix<double>(s.d, s.r, gen));
  layer.set_b(normal_matrix<double>(1, s.d, gen));
  Tensor<double> X = to_backend<double>(backend, normal_matrix<double>(s.n, s.k, gen), "X");
  Tensor<double> target = to_backend<double>(backend, normal_matrix<double>(s.n, s.d, gen), "target");
  MseLoss<double> mse(backend);
  auto loss = [&]() {
    layer.forward_with_loss(X, mse, target);
    return mse.value();
  };
  loss();
  layer.backward(mse.gradient(), need_dX);
  const HostMatrix<double> dA = to_host(backend, layer.dA()), dB = to_host(backend, layer.dB()),
                           db = to_host(backend, layer.db());
  auto numeric = [&](const Tensor<double>& t, const HostMatrix<double>& analytic) {
    return numeric_gradient_on(backend, const_cast<Tensor<double>&>(t), loss, 1e-6, &analytic);
  };
  CHECK(relative_error(dA, numeric(layer.A(), dA)) < 1e-7);
  CHECK(relative_error(dB, numeric(layer.B(), dB)) < 1e-7);
  CHECK(relative_error(db, numeric(layer.b(), db)) < 1e-7);
  if (need_dX) {
    const HostMatrix<double> dX = to_host(backend, layer.dX());
    CHECK(relative_error(dX, numeric(X, dX)) < 1e-7);
  }
}

// The implementation that runs a layer of shape s (batch included) on `backend`: the one
// make_lora_linear picks where its own path takes the batch, else "reference".
template <typename T>
std::string implementation_for(Backend<T>& backend, const LayerShape& s) {
  const LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r};
  const auto layer = make_lora_linear<T>(backend, config, HostMatrix<T>::Zero(s.d, s.k));
  return layer->fast_path_for(s.n) ? layer->implementation() : "reference";
}

}  // namespace relora::testing
