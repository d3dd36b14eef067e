// Every kind of bad input gets an exception whose message names what was wrong and the shapes.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>

#include "relora/relora.hpp"

using namespace relora;

TEST_CASE("bad LoRA configs are refused with the value and the layer's shape") {
  auto backend = make_backend<float>(Device::cpu);
  auto make = [&](LoraConfig c) { LoraLinear<float> layer(*backend, c); };
  LoraConfig ok{.in_features = 10, .out_features = 5, .rank = 4};
  CHECK_NOTHROW(make(ok));
  LoraConfig c = ok;
  c.rank = 0;
  CHECK_THROWS_WITH_AS(make(c), doctest::Contains("LoraLinear 10 -> 5: rank 0 must be in [1, min(in, out) = 5]"),
                       ConfigError);
  c.rank = 6;
  CHECK_THROWS_WITH_AS(make(c), doctest::Contains("rank 6 must be in [1, min(in, out) = 5]"), ConfigError);
  c = ok;
  c.alpha = 0;
  CHECK_THROWS_WITH_AS(make(c), doctest::Contains("alpha 0.000000 must be positive"), ConfigError);
  c.alpha = -1;
  CHECK_THROWS_AS(make(c), ConfigError);
  c = ok;
  c.dropout = 1.0;
  CHECK_THROWS_WITH_AS(make(c), doctest::Contains("dropout 1.000000 must be in [0, 1)"), ConfigError);
  c.dropout = -0.1;
  CHECK_THROWS_AS(make(c), ConfigError);
  c = ok;
  c.in_features = 0;
  CHECK_THROWS_WITH_AS(make(c), doctest::Contains("must be positive"), ConfigError);
  c = ok;
  c.init = LoraInit::gaussian;
  c.init_std = 0;
  CHECK_THROWS_AS(make(c), ConfigError);
}

TEST_CASE("mismatched shapes name both shapes") {
  auto backend = make_backend<float>(Device::cpu);
  LoraConfig config{.in_features = 10, .out_features = 5, .rank = 4, .bias = BiasMode::frozen};
  CHECK_THROWS_WITH_AS(LoraLinear<float>(*backend, config, HostMatrix<float>::Zero(10, 5)),
                       doctest::Contains("expected shape [5 x 10], got [10 x 5]"), ShapeError);
  LoraLinear<float> layer(*backend, config);
  CHECK_THROWS_WITH_AS(layer.set_b(HostMatrix<float>::Zero(1, 4)), doctest::Contains("expected 5 values"), ShapeError);
  CHECK_THROWS_WITH_AS(layer.set_A(HostMatrix<float>::Zero(5, 10)),
                       doctest::Contains("expected shape [4 x 10], got [5 x 10]"), ShapeError);
  Tensor<float> X = backend->allocate(3, 9);
  CHECK_THROWS_WITH_AS(layer.forward(X), doctest::Contains("X is [3 x 9] but the layer takes [n x 10]"), ShapeError);
  Tensor<float> good_X = to_backend<float>(*backend, HostMatrix<float>::Ones(3, 10), "X");
  layer.forward(good_X);
  Tensor<float> dY = backend->allocate(3, 4);
  CHECK_THROWS_WITH_AS(layer.backward(dY, true), doctest::Contains("expected shape [3 x 5], got [3 x 4]"), ShapeError);

  MseLoss<float> loss(*backend);
  Tensor<float> target = backend->allocate(3, 4);
  CHECK_THROWS_WITH_AS(loss.forward_backward(layer.output(), target),
                       doctest::Contains("prediction is [3 x 5] but target is [3 x 4]"), ShapeError);
  Tensor<float> C = backend->allocate(2, 2);
  CHECK_THROWS_WITH_AS(backend->gemm(Trans::no, Trans::no, 1.f, good_X, good_X, 0.f, C),
                       doctest::Contains("op(A) [3 x 10] times op(B) [3 x 10] into C [2 x 2]"), ShapeError);
}

TEST_CASE("NaN or Inf in an input is refused at upload, naming where") {
  auto backend = make_backend<float>(Device::cpu);
  HostMatrix<float> x = HostMatrix<float>::Ones(4, 3);
  x(2, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(to_backend<float>(*backend, x, "input X"),
                       doctest::Contains("input X [4 x 3] holds nan at (2, 1)"), NonFiniteError);
  x(2, 1) = std::numeric_limits<float>::infinity();
  Model<float> model(backend);
  model.add(LoraConfig{.in_features = 3, .out_features = 2, .rank = 1}, Activation::identity);
  CHECK_THROWS_AS(model.predict(x), NonFiniteError);
}

TEST_CASE("a NaN loss or gradient refuses the step and updates nothing") {
  auto backend = make_backend<float>(Device::cpu);
  Model<float> model(backend);
  LoraLinear<float>& layer = model.add(LoraConfig{.in_features = 3, .out_features = 2, .rank = 1}, Activation::identity);
  layer.set_B(HostMatrix<float>::Constant(2, 1, 0.5f));
  Adam<float> adam(backend, model.parameters(), AdamConfig{.lr = 0.1});
  Tensor<float> X = to_backend<float>(*backend, HostMatrix<float>::Ones(4, 3), "X");
  Tensor<float> target = backend->allocate(4, 2);
  backend->fill(target, std::numeric_limits<float>::infinity());  // device-side data can go bad
  MseLoss<float> loss(*backend);
  model.backward(loss.forward_backward(model.forward(X), target));
  CHECK(!std::isfinite(loss.value()));
  const HostMatrix<float> A_before = to_host(*backend, layer.A()), B_before = to_host(*backend, layer.B());
  CHECK_THROWS_WITH_AS(adam.step(), doctest::Contains("gradient of 'layers.0.lora_A' holds NaN or Inf"),
                       NonFiniteError);
  CHECK(to_host(*backend, layer.A()) == A_before);
  CHECK(to_host(*backend, layer.B()) == B_before);
  CHECK(adam.update_count(0).data()[0] == 0);
  CHECK(adam.m(1).data()[0] == 0);
}

TEST_CASE("merge state is enforced: no training or second merge while merged") {
  auto backend = make_backend<float>(Device::cpu);
  LoraLinear<float> layer(*backend, LoraConfig{.in_features = 3, .out_features = 2, .rank = 1});
  CHECK_THROWS_WITH_AS(layer.unmerge(), doctest::Contains("not merged"), ConfigError);
  Tensor<float> X = to_backend<float>(*backend, HostMatrix<float>::Ones(4, 3), "X");
  layer.merge();
  CHECK_THROWS_WITH_AS(layer.merge(), doctest::Contains("cannot merge while the adapter is merged"), ConfigError);
  layer.forward(X);
  Tensor<float> dY = backend->allocate(4, 2);
  CHECK_THROWS_WITH_AS(layer.backward(dY, false), doctest::Contains("cannot train while the adapter is merged"),
                       ConfigError);
}

TEST_CASE("bad optimizer settings are refused") {
  auto backend = make_backend<float>(Device::cpu);
  LoraLinear<float> layer(*backend, LoraConfig{.in_features = 3, .out_features = 2, .rank = 1});
  auto params = layer.parameters("l");
  CHECK_THROWS_WITH_AS(Adam<float>(backend, params, AdamConfig{.lr = -1}), doctest::Contains("lr -1"), ConfigError);
  CHECK_THROWS_WITH_AS(Adam<float>(backend, params, AdamConfig{.beta1 = 1.0}), doctest::Contains("beta1"), ConfigError);
  CHECK_THROWS_WITH_AS(Adam<float>(backend, params, AdamConfig{.eps = 0}), doctest::Contains("eps"), ConfigError);
  std::vector<ParamGroup<float>> twice{{"a", params, -1, -1}, {"b", params, -1, -1}};
  CHECK_THROWS_WITH_AS(Adam<float>(backend, twice), doctest::Contains("appears in more than one group"), ConfigError);
  Adam<float> adam(backend, params);
  CHECK_THROWS_AS(adam.step(std::nan("")), ConfigError);
}
