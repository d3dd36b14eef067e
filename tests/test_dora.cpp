// DoraLinear: the norm identity against the formed norm, zero rows of W, both gradient modes
// against central finite differences in double (of a naive reference that forms V, with the norm
// frozen for the detached mode), through a two-layer stack, with rsLoRA, bias and dropout; merge,
// unmerge and reinit; a ReLoRA restart; bad configs; CPU/CUDA parity (skipped without a GPU).
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gradient_check.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::host_of;
using relora::testing::normal_matrix;
using relora::testing::relative_error;

namespace {

// The naive reference: V formed, n its row norms (or given, frozen), PEFT's dropout formula.
struct NaiveDora {
  HostMatrix<double> W, A, B, m, b;  // m and b are 1 x d; b empty without a bias
  double s = 1, eps = 1e-6;

  HostMatrix<double> V() const { return W + s * B * A; }
  HostMatrix<double> norms() const { return V().rowwise().norm().transpose(); }
  // Y for input X; `mask` empty without dropout; `frozen_n` null: the norms of the current V.
  HostMatrix<double> forward(const HostMatrix<double>& X, const HostMatrix<double>& mask,
                             const HostMatrix<double>* frozen_n = nullptr) const {
    const HostMatrix<double> n = frozen_n ? *frozen_n : norms();
    HostMatrix<double> g(1, W.rows());
    for (Index i = 0; i < W.rows(); ++i) g(0, i) = m(0, i) / std::max(n(0, i), eps);
    const HostMatrix<double> Xd = mask.size() ? HostMatrix<double>(X.cwiseProduct(mask)) : X;
    HostMatrix<double> Y = (Xd * W.transpose() + s * Xd * A.transpose() * B.transpose()) * g.asDiagonal();
    if (mask.size()) Y += (X - Xd) * W.transpose();
    if (b.size()) Y.rowwise() += b.row(0);
    return Y;
  }
};

// dL/dx of a host matrix by central differences.
HostMatrix<double> numeric(HostMatrix<double>& x, const std::function<double()>& loss, double h = 1e-6) {
  HostMatrix<double> grad(x.rows(), x.cols());
  for (Index i = 0; i < x.size(); ++i) {
    const double saved = x.data()[i];
    x.data()[i] = saved + h;
    const double up = loss();
    x.data()[i] = saved - h;
    const double down = loss();
    x.data()[i] = saved;
    grad.data()[i] = (up - down) / (2 * h);
  }
  return grad;
}

// Relative error, against at least 1e-2: a gradient that is zero in truth (the exact mode of a
// layer with k = 1, whose output does not depend on the adapter's scale) compares by the finite
// differences' own noise, eps L / h, about 1e-9 here (and 4e-9 seen in a build without FMA).
void expect_close(const HostMatrix<double>& analytic, const HostMatrix<double>& numeric_grad, const char* name,
                  double tolerance = 1e-6) {
  const double err = (analytic - numeric_grad).norm() / std::max(numeric_grad.norm(), 1e-2);
  INFO(std::string(name) << ": relative error " << err << " (|analytic| " << analytic.norm() << ")");
  CHECK(err < tolerance);
}

template <typename T>
NaiveDora naive_of(Backend<T>& backend, const DoraLinear<T>& layer) {
  NaiveDora ref;
  ref.W = to_host(backend, layer.W()).template cast<double>();
  ref.A = to_host(backend, layer.A()).template cast<double>();
  ref.B = to_host(backend, layer.B()).template cast<double>();
  ref.m = to_host(backend, layer.m()).template cast<double>();
  if (layer.has_bias()) ref.b = to_host(backend, layer.b()).template cast<double>();
  ref.s = double(layer.scale());
  ref.eps = layer.config().eps;
  return ref;
}

struct Case {
  Index n, k, d, r;
  double dropout = 0;
  BiasMode bias = BiasMode::trainable;
  bool rslora = false;
  DoraGradient mode = DoraGradient::detached;
  TrainTarget target = TrainTarget::adapter;
  Index zero_m = -1;    // a row whose m is set to 0 (g = 0: Z's column cannot be read back from Y)
  bool with_dX = true;  // without dX the backward leaves dY unscaled and folds g into B and dB
};

// One layer, L = sum(Y .* G): every gradient against the naive reference's finite differences
// (n frozen at the forward's values in the detached mode, the true function in the exact mode).
void check_single_layer(const Case& c) {
  CAPTURE(c.n);
  CAPTURE(c.k);
  CAPTURE(c.d);
  CAPTURE(c.r);
  CAPTURE(c.dropout);
  CAPTURE(int(c.bias));
  CAPTURE(c.rslora);
  CAPTURE(int(c.mode));
  CAPTURE(int(c.target));
  CAPTURE(c.zero_m);
  CAPTURE(c.with_dX);
  auto backend = make_backend<double>(Device::cpu);
  std::mt19937 gen(unsigned(c.n * 1000 + c.k * 100 + c.d * 10 + c.r));
  DoraConfig config{.lora = {.in_features = c.k, .out_features = c.d, .rank = c.r, .alpha = 3.0, .rslora = c.rslora,
                             .dropout = c.dropout, .bias = c.bias, .seed = 7},
                    .gradient = c.mode};
  DoraLinear<double> layer(*backend, config, normal_matrix(c.d, c.k, gen));
  layer.set_B(normal_matrix(c.d, c.r, gen, 0.5));  // B = 0 would hide the adapter's and the norm's terms
  HostMatrix<double> m = to_host(*backend, layer.m());
  m.array() *= 1.0 + 0.3 * normal_matrix(1, c.d, gen).array();  // g away from 1
  if (c.zero_m >= 0) m(0, c.zero_m) = 0;
  layer.set_m(m);
  if (c.bias != BiasMode::none) layer.set_b(normal_matrix(1, c.d, gen));
  layer.set_train_target(c.target);
  const HostMatrix<double> X = normal_matrix(c.n, c.k, gen), G = normal_matrix(c.n, c.d, gen);
  Tensor<double> Xt = to_backend<double>(*backend, X, "X"), dY = to_backend<double>(*backend, G, "dY");

  const std::uint64_t stream = layer.rng_stream();
  const HostMatrix<double> Y = host_of(layer.forward(Xt));
  Tensor<double> dX = backend->allocate(c.n, c.k);
  layer.backward(dY, c.with_dX ? &dX : nullptr);
  const bool dropout_on = c.dropout > 0 && c.target == TrainTarget::adapter;
  const HostMatrix<double> mask = dropout_on ? host_of(layer.dropout_mask()) : HostMatrix<double>();

  NaiveDora ref = naive_of(*backend, layer);
  const HostMatrix<double> n0 = ref.norms();
  CHECK(relative_error(host_of(layer.norms()), n0) < 1e-12);
  CHECK(relative_error(Y, ref.forward(X, mask)) < 1e-12);
  const HostMatrix<double>* frozen = c.mode == DoraGradient::detached ? &n0 : nullptr;
  HostMatrix<double> Xh = X;
  const auto loss = [&] { return ref.forward(Xh, mask, frozen).cwiseProduct(G).sum(); };

  if (c.target == TrainTarget::adapter) {
    expect_close(host_of(layer.dA()), numeric(ref.A, loss), "dA");
    expect_close(host_of(layer.dB()), numeric(ref.B, loss), "dB");
    expect_close(host_of(layer.dm()), numeric(ref.m, loss), "dm");
  } else {
    expect_close(host_of(layer.dW()), numeric(ref.W, loss), "dW");
  }
  if (c.bias == BiasMode::trainable) expect_close(host_of(layer.db()), numeric(ref.b, loss), "db");
  if (c.with_dX) expect_close(host_of(dX), numeric(Xh, loss), "dX");
  if (c.zero_m >= 0 && !dropout_on) CHECK(host_of(layer.recomputed_columns())(0, c.zero_m) == 1.0);

  // The exact mode against the layer's own forward too (the same mask at every evaluation).
  if (c.mode == DoraGradient::exact && c.target == TrainTarget::adapter) {
    const auto own = [&] {
      layer.set_rng_stream(stream);
      return host_of(layer.forward(Xt)).cwiseProduct(G).sum();
    };
    expect_close(host_of(layer.dA()), testing::numeric_gradient(const_cast<Tensor<double>&>(layer.A()), own),
                 "dA (layer's forward)");
    expect_close(host_of(layer.dB()), testing::numeric_gradient(const_cast<Tensor<double>&>(layer.B()), own),
                 "dB (layer's forward)");
  }
}

std::vector<Case> shapes() {
  std::vector<Case> cases = {{1, 3, 2, 1}, {5, 4, 4, 4}, {7, 6, 3, 3}, {4, 3, 8, 3}, {9, 10, 5, 2}};
  std::mt19937 gen(2025);
  for (int i = 0; i < 6; ++i) {
    const Index n = 1 + gen() % 8, k = 1 + gen() % 9, d = 1 + gen() % 9;
    cases.push_back({n, k, d, Index(1 + gen() % std::min(k, d))});
  }
  return cases;
}

}  // namespace

TEST_CASE("DoRA norm identity agrees with the formed norm, float and double, with nearly cancelling rows") {
  // n_i^2 from ||W_i||^2 + sum_j B_ij (2 s P_ij + s^2 (BG)_ij) against ||W_i + s B_i A|| formed in
  // double from the same values. The identity's rounding error in n_i^2 is about (k + r) u M_i with
  // M_i = (||W_i|| + |s| sum_j |B_ij| ||A_j||)^2, the size of its terms: the check allows 4 (k + r) u M_i.
  // Where V_i nearly cancels (n_i^2 << M_i) this is a large relative error in n_i, which is the cost
  // of not forming V; rows that do not cancel must come out to a few (k + r) u relative.
  const auto run = [](auto zero) {
    using T = decltype(zero);
    const double u = std::numeric_limits<T>::epsilon() / 2;
    const Index k = 96, d = 64, r = 8;
    auto backend = make_backend<T>(Device::cpu);
    std::mt19937_64 gen(11);
    DoraConfig config{.lora = {.in_features = k, .out_features = d, .rank = r, .alpha = 16}};
    HostMatrix<T> W = normal_matrix<T>(d, k, gen, 1.0 / std::sqrt(double(k)));
    DoraLinear<T> layer(*backend, config, W);
    const HostMatrix<T> B = normal_matrix<T>(d, r, gen, 0.05);
    layer.set_B(B);
    const HostMatrix<double> A = to_host(*backend, layer.A()).template cast<double>();
    const double s = double(layer.scale());
    // Rows 0..7 nearly cancel: W_i = -s B_i A + a perturbation 1e-3 (row 0: 1e-5) of its size.
    for (Index i = 0; i < 8; ++i) {
      const HostMatrix<double> lora_row = s * B.row(i).template cast<double>() * A;
      const double rel = i == 0 ? 1e-5 : 1e-3;
      W.row(i) = (-lora_row + rel * lora_row.norm() / std::sqrt(double(k)) * normal_matrix(1, k, gen)).template cast<T>();
    }
    layer.set_W(W);
    Tensor<T> X = to_backend<T>(*backend, normal_matrix<T>(3, k, gen), "X");
    layer.forward(X);
    const HostMatrix<double> n = to_host(*backend, layer.norms()).template cast<double>();
    const HostMatrix<double> Wd = W.template cast<double>(), Bd = B.template cast<double>();
    const HostMatrix<double> formed = (Wd + s * Bd * A).rowwise().norm();
    double worst_ratio = 0, worst_relative = 0;
    for (Index i = 0; i < d; ++i) {
      double lora_size = 0;
      for (Index j = 0; j < r; ++j) lora_size += std::abs(s * Bd(i, j)) * A.row(j).norm();
      const double M = std::pow(Wd.row(i).norm() + lora_size, 2);
      const double err = std::abs(n(0, i) * n(0, i) - formed(i) * formed(i));
      worst_ratio = std::max(worst_ratio, err / (double(k + r) * u * M));
      CHECK(err <= 4 * double(k + r) * u * M);
      if (formed(i) * formed(i) > 0.1 * M) {
        worst_relative = std::max(worst_relative, std::abs(n(0, i) - formed(i)) / formed(i));
      }
    }
    MESSAGE(std::string(sizeof(T) == 4 ? "float" : "double") << ": worst |n^2 error| / ((k + r) u M) " << worst_ratio
                                                   << ", worst relative n error off cancellation " << worst_relative);
    // Off cancellation (n_i^2 > M_i / 10) the bound above gives at most 20 (k + r) u relative in n_i.
    CHECK(worst_relative <= 20 * double(k + r) * u);
    CHECK(formed(0) < 1e-4 * formed.maxCoeff());  // the cancelling rows are in the test
  };
  run(0.0f);
  run(0.0);
}

TEST_CASE("DoRA: a zero row of W gives finite outputs and gradients in both modes") {
  for (DoraGradient mode : {DoraGradient::detached, DoraGradient::exact}) {
    for (bool fresh : {true, false}) {
      CAPTURE(int(mode));
      CAPTURE(fresh);
      auto backend = make_backend<float>(Device::cpu);
      std::mt19937_64 gen(5);
      HostMatrix<float> W = normal_matrix<float>(6, 5, gen);
      W.row(2).setZero();
      W.row(4).setZero();
      DoraConfig config{.lora = {.in_features = 5, .out_features = 6, .rank = 2, .bias = BiasMode::trainable},
                        .gradient = mode};
      DoraLinear<float> layer(*backend, config, W);
      CHECK(to_host(*backend, layer.m())(0, 2) == 0.0f);
      if (!fresh) layer.set_B(normal_matrix<float>(6, 2, gen));  // n of a zero row is then ||s B_i A||
      Tensor<float> X = to_backend<float>(*backend, normal_matrix<float>(4, 5, gen), "X");
      Tensor<float> dY = to_backend<float>(*backend, normal_matrix<float>(4, 6, gen), "dY");
      Tensor<float> dX = backend->allocate(4, 5);
      CHECK(to_host(*backend, layer.forward(X)).allFinite());
      layer.backward(dY, &dX);
      CHECK(to_host(*backend, dX).allFinite());
      CHECK(to_host(*backend, layer.dA()).allFinite());
      CHECK(to_host(*backend, layer.dB()).allFinite());
      CHECK(to_host(*backend, layer.dm()).allFinite());
      CHECK(to_host(*backend, layer.db()).allFinite());
      layer.merge();
      CHECK(to_host(*backend, layer.W()).allFinite());
    }
  }
}

TEST_CASE("DoRA gradients (detached norm) match finite differences of the function with n frozen") {
  for (Case c : shapes()) check_single_layer(c);
}

TEST_CASE("DoRA gradients (exact) match finite differences of the true function") {
  for (Case c : shapes()) {
    c.mode = DoraGradient::exact;
    check_single_layer(c);
  }
}

TEST_CASE("DoRA gradients with rsLoRA, a frozen or no bias, and dropout (fixed mask), both modes") {
  for (DoraGradient mode : {DoraGradient::detached, DoraGradient::exact}) {
    check_single_layer({6, 7, 5, 3, 0.0, BiasMode::frozen, true, mode});
    check_single_layer({6, 7, 5, 3, 0.0, BiasMode::none, false, mode});
    check_single_layer({6, 7, 5, 3, 0.3, BiasMode::trainable, false, mode});
    check_single_layer({3, 9, 4, 2, 0.5, BiasMode::none, true, mode});
  }
}

TEST_CASE("DoRA gradients with a column of m = 0 (recomputed Z), and without dX (dY left unscaled), both modes") {
  for (DoraGradient mode : {DoraGradient::detached, DoraGradient::exact}) {
    for (bool with_dX : {true, false}) {
      check_single_layer({6, 7, 5, 3, 0.0, BiasMode::frozen, false, mode, TrainTarget::adapter, 2, with_dX});
      check_single_layer({5, 4, 6, 2, 0.0, BiasMode::trainable, true, mode, TrainTarget::adapter, 0, with_dX});
      check_single_layer({5, 4, 6, 2, 0.0, BiasMode::none, false, mode, TrainTarget::adapter, -1, with_dX});
      check_single_layer({6, 7, 5, 3, 0.3, BiasMode::trainable, false, mode, TrainTarget::adapter, 1, with_dX});
    }
    check_single_layer({4, 5, 6, 2, 0.0, BiasMode::trainable, false, mode, TrainTarget::base, 3});
  }
}

TEST_CASE("DoRA base-weight gradient (full fine-tuning) matches finite differences, both modes") {
  for (DoraGradient mode : {DoraGradient::detached, DoraGradient::exact}) {
    check_single_layer({5, 6, 4, 2, 0.2, BiasMode::trainable, false, mode, TrainTarget::base});
    check_single_layer({3, 4, 7, 3, 0.0, BiasMode::none, true, mode, TrainTarget::base});
  }
}

TEST_CASE("DoRA gradients through a two-layer stack with tanh and dropout, both modes") {
  for (DoraGradient mode : {DoraGradient::detached, DoraGradient::exact}) {
    CAPTURE(int(mode));
    auto backend = make_backend<double>(Device::cpu);
    std::mt19937_64 gen(21);
    Model<double> model(backend);
    const auto cfg = [&](Index k, Index d, Index r, BiasMode bias, double dropout, std::uint64_t seed) {
      return DoraConfig{.lora = {.in_features = k, .out_features = d, .rank = r, .alpha = 2, .dropout = dropout,
                                 .bias = bias, .seed = seed},
                        .gradient = mode};
    };
    auto first = std::make_unique<DoraLinear<double>>(*backend, cfg(5, 6, 2, BiasMode::trainable, 0.25, 1),
                                                      normal_matrix(6, 5, gen));
    auto second = std::make_unique<DoraLinear<double>>(*backend, cfg(6, 3, 2, BiasMode::none, 0.0, 2),
                                                       normal_matrix(3, 6, gen));
    first->set_b(normal_matrix(1, 6, gen));
    DoraLinear<double>* layers[2] = {first.get(), second.get()};
    for (DoraLinear<double>* layer : layers) {
      layer->set_B(normal_matrix(layer->out_features(), layer->rank(), gen, 0.5));
      HostMatrix<double> m = to_host(*backend, layer->m());
      m.array() *= 1.2;
      layer->set_m(m);
    }
    model.add(std::move(first), Activation::tanh, "fc1");
    model.add(std::move(second), Activation::identity, "fc2");
    const HostMatrix<double> X = normal_matrix(4, 5, gen), G = normal_matrix(4, 3, gen);
    Tensor<double> Xt = to_backend<double>(*backend, X, "X"), dY = to_backend<double>(*backend, G, "dY");
    model.forward(Xt);
    model.backward(dY);

    NaiveDora ref[2] = {naive_of(*backend, *layers[0]), naive_of(*backend, *layers[1])};
    const HostMatrix<double> mask0 = host_of(layers[0]->dropout_mask());
    const HostMatrix<double> n0 = ref[0].norms(), n1 = ref[1].norms();
    const bool frozen = mode == DoraGradient::detached;
    const auto loss = [&] {
      const HostMatrix<double> H = ref[0].forward(X, mask0, frozen ? &n0 : nullptr).array().tanh().matrix();
      return ref[1].forward(H, HostMatrix<double>(), frozen ? &n1 : nullptr).cwiseProduct(G).sum();
    };
    for (int l = 0; l < 2; ++l) {
      CAPTURE(l);
      expect_close(host_of(layers[l]->dA()), numeric(ref[l].A, loss), "dA");
      expect_close(host_of(layers[l]->dB()), numeric(ref[l].B, loss), "dB");
      expect_close(host_of(layers[l]->dm()), numeric(ref[l].m, loss), "dm");
    }
    expect_close(host_of(layers[0]->db()), numeric(ref[0].b, loss), "db");
  }
}

TEST_CASE("DoRA: a fresh layer gives the base output; PEFT's names and roles") {
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937_64 gen(8);
  const HostMatrix<float> W = normal_matrix<float>(7, 5, gen);
  DoraConfig config{.lora = {.in_features = 5, .out_features = 7, .rank = 3, .bias = BiasMode::trainable}};
  DoraLinear<float> layer(*backend, config, W, normal_matrix<float>(7, 1, gen).col(0));
  const HostMatrix<float> X = normal_matrix<float>(4, 5, gen);
  Tensor<float> Xt = to_backend<float>(*backend, X, "X");
  const HostMatrix<float> base = (X * W.transpose()).rowwise() + to_host(*backend, layer.b()).row(0);
  CHECK((to_host(*backend, layer.forward(Xt)) - base).norm() <= 1e-6f * base.norm());
  CHECK((to_host(*backend, layer.factors()).array() == 1.0f).all());  // g = 1 exactly: m was rounded as n is
  CHECK(std::string(layer.kind()) == "dora");
  const std::vector<Parameter<float>> params = layer.parameters("fc");
  REQUIRE(params.size() == 4);
  CHECK(params[2].name == "fc.lora_magnitude_vector");
  CHECK(params[2].role == ParamRole::magnitude);
}

TEST_CASE("DoRA merge gives the unmerged output, unmerge gives back W, reinit keeps the output and m") {
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937_64 gen(9);
  const Index k = 12, d = 10, r = 3;
  const HostMatrix<float> W0 = normal_matrix<float>(d, k, gen, 0.3);
  DoraLinear<float> layer(*backend, DoraConfig{.lora = {.in_features = k, .out_features = d, .rank = r, .alpha = 6,
                                                        .bias = BiasMode::trainable}},
                          W0);
  layer.set_B(normal_matrix<float>(d, r, gen, 0.2));
  layer.set_b(normal_matrix<float>(1, d, gen));
  HostMatrix<float> m = to_host(*backend, layer.m());
  m.array() *= 1.0f + 0.2f * normal_matrix<float>(1, d, gen).array();
  m(0, 3) = -m(0, 3);  // a negative magnitude: its row carries the sign after the merge
  layer.set_m(m);
  const HostMatrix<float> X = normal_matrix<float>(6, k, gen);
  Tensor<float> Xt = to_backend<float>(*backend, X, "X");
  const HostMatrix<float> before = to_host(*backend, layer.forward(Xt));
  const HostMatrix<float> n = to_host(*backend, layer.norms());

  layer.merge();
  CHECK(layer.merged());
  const HostMatrix<float> merged_W = to_host(*backend, layer.W());
  const HostMatrix<float> merged_out = to_host(*backend, layer.forward(Xt));
  INFO("merged output error " << (merged_out - before).norm() / before.norm());
  CHECK((merged_out - before).norm() <= 1e-5f * before.norm());
  // The merged rows' norms are |m_i| (n_i >= eps here).
  CHECK((merged_W.rowwise().norm().transpose() - m.cwiseAbs()).norm() <= 1e-5f * m.norm());
  CHECK_THROWS_AS(layer.merge(), ConfigError);

  layer.unmerge();
  CHECK((to_host(*backend, layer.W()) - W0).norm() <= 1e-5f * W0.norm());
  CHECK((to_host(*backend, layer.forward(Xt)) - before).norm() <= 1e-5f * before.norm());

  layer.merge();
  const HostMatrix<float> A_before = to_host(*backend, layer.A());
  layer.reinit();
  CHECK_FALSE(layer.merged());
  CHECK(to_host(*backend, layer.B()).norm() == 0);
  CHECK((to_host(*backend, layer.A()) - A_before).norm() > 0);
  const HostMatrix<float> after = to_host(*backend, layer.forward(Xt));
  CHECK((after - before).norm() <= 1e-5f * before.norm());
  CHECK((to_host(*backend, layer.factors()).array() == 1.0f).all());  // g = 1 exactly after the restart
  // m kept: |m| to rounding (the negative one becomes |m|, its sign now in W).
  CHECK((to_host(*backend, layer.m()) - m.cwiseAbs()).norm() <= 1e-5f * m.norm());
  (void)n;
}

TEST_CASE("DoRA merge refuses a non-finite or overflowing result and leaves W unchanged; unmerge of g = 0") {
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937_64 gen(10);
  const HostMatrix<float> W = normal_matrix<float>(5, 4, gen);
  DoraLinear<float> layer(*backend, DoraConfig{.lora = {.in_features = 4, .out_features = 5, .rank = 2}}, W);
  HostMatrix<float> B = normal_matrix<float>(5, 2, gen);
  B(1, 1) = std::numeric_limits<float>::quiet_NaN();
  // set_B refuses NaN itself: put it in through the tensor, as a diverged optimizer would.
  Tensor<float>& B_tensor = const_cast<Tensor<float>&>(layer.B());
  backend->upload(B.data(), B_tensor);
  CHECK_THROWS_WITH_AS(layer.merge(), doctest::Contains("lora_B holds NaN or Inf"), ConfigError);
  CHECK(to_host(*backend, layer.W()) == W);
  CHECK_FALSE(layer.merged());

  // Finite parameters whose adapter overflows (A A^T and s B A beyond float's range).
  B(1, 1) = 1;
  layer.set_B(B * 1e19f);
  layer.set_A(normal_matrix<float>(2, 4, gen, 1e19));
  CHECK_THROWS_WITH_AS(layer.merge(), doctest::Contains("merge refused"), ConfigError);
  CHECK(to_host(*backend, layer.W()) == W);

  // A merge whose crude bound max|g| (max|W| + |s| r max|B| max|A|) overflows but whose rows do
  // not (the merged row norms are |m_i|): checked a block of rows at a time, and done.
  layer.set_B(B);
  layer.set_A(normal_matrix<float>(2, 4, gen, 100.0));
  HostMatrix<float> m = to_host(*backend, layer.m());
  m(0, 3) = 1e37f;
  layer.set_m(m);
  layer.merge();
  const HostMatrix<float> merged = to_host(*backend, layer.W());
  CHECK(merged.allFinite());
  CHECK(merged.row(3).cast<double>().norm() == doctest::Approx(1e37).epsilon(1e-5));
  layer.unmerge();
  CHECK((to_host(*backend, layer.W()) - W).norm() <= 1e-4f * W.norm());

  // A zero magnitude merges (its row becomes 0) but cannot be unmerged.
  m(0, 3) = 0;
  layer.set_m(m);
  layer.merge();
  CHECK_THROWS_WITH_AS(layer.unmerge(), doctest::Contains("row 3"), ConfigError);
  CHECK(layer.merged());
}

TEST_CASE("DoRA: the loss just before and just after a ReLoRA restart agree to float rounding") {
  for (DoraGradient mode : {DoraGradient::detached, DoraGradient::exact}) {
    CAPTURE(int(mode));
    auto backend = make_backend<float>(Device::cpu);
    std::mt19937_64 gen(3);
    const HostMatrix<float> X = normal_matrix<float>(64, 8, gen);
    const HostMatrix<float> Y = (X * normal_matrix<float>(5, 8, gen).transpose()).array().sin().matrix();
    Model<float> model(backend);
    model.add(std::make_unique<DoraLinear<float>>(
                  *backend,
                  DoraConfig{.lora = {.in_features = 8, .out_features = 6, .rank = 3, .bias = BiasMode::trainable},
                             .gradient = mode},
                  normal_matrix<float>(6, 8, gen)),
              Activation::tanh, "fc1");
    model.add(std::make_unique<DoraLinear<float>>(
                  *backend, DoraConfig{.lora = {.in_features = 6, .out_features = 5, .rank = 2}, .gradient = mode},
                  normal_matrix<float>(5, 6, gen, 0.3)),
              Activation::identity, "fc2");
    TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-2}, .relora = {.restart_every = 1000}};
    Trainer<float> trainer(model, config);
    Tensor<float> Xt = to_backend<float>(*backend, X, "X"), Yt = to_backend<float>(*backend, Y, "Y");
    for (int i = 0; i < 30; ++i) trainer.step(Xt, Yt);
    auto& fc2 = dynamic_cast<DoraLinear<float>&>(model.layer(1));
    const HostMatrix<float> m_before = to_host(*backend, fc2.m());
    CHECK(to_host(*backend, fc2.B()).norm() > 0);
    MseLoss<float> probe(*backend);
    probe.forward_backward(model.forward(Xt), Yt);
    const float before = probe.value();
    trainer.controller()->restart(model, trainer.optimizer(), nullptr, trainer.steps_done());
    probe.forward_backward(model.forward(Xt), Yt);
    const float after = probe.value();
    INFO("loss before " << before << ", after " << after);
    CHECK(std::abs(after - before) <= 1e-6f * before);
    CHECK(to_host(*backend, fc2.B()).norm() == 0);
    CHECK((to_host(*backend, fc2.m()) - m_before).norm() <= 1e-5f * m_before.norm());  // m keeps its value
    for (int i = 0; i < 5; ++i) trainer.step(Xt, Yt);  // and trains on
    CHECK(std::isfinite(trainer.loss()));
  }
}

TEST_CASE("DoRA: the ReLoRA restart resets the magnitude's optimizer state with A's and B's") {
  auto backend = make_backend<double>(Device::cpu);
  std::mt19937_64 gen(4);
  Model<double> model(backend);
  model.add(std::make_unique<DoraLinear<double>>(
                *backend, DoraConfig{.lora = {.in_features = 4, .out_features = 3, .rank = 2, .bias = BiasMode::trainable}},
                normal_matrix(3, 4, gen)),
            Activation::identity, "fc");
  TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-2}, .relora = {.restart_every = 1000}};
  Trainer<double> trainer(model, config);
  Tensor<double> X = to_backend<double>(*backend, normal_matrix(8, 4, gen), "X");
  Tensor<double> Y = to_backend<double>(*backend, normal_matrix(8, 3, gen), "Y");
  for (int i = 0; i < 3; ++i) trainer.step(X, Y);
  trainer.controller()->restart(model, trainer.optimizer(), nullptr, trainer.steps_done());
  StateDict<double> state;
  trainer.optimizer().save_state(state);
  CHECK(state.tensor("fc.lora_magnitude_vector.m", 1, 3).norm() == 0);
  CHECK(state.tensor("fc.lora_A.m", 2, 4).norm() == 0);
  CHECK(state.tensor("fc.bias.m", 1, 3).norm() > 0);  // not part of the adapter
}

TEST_CASE("DoRA: bad configs are refused with the value") {
  auto backend = make_backend<float>(Device::cpu);
  const HostMatrix<float> W = HostMatrix<float>::Ones(4, 6);
  const auto refused = [&](const DoraConfig& config, const std::string& expected) {
    CAPTURE(expected);
    CHECK_THROWS_WITH_AS(DoraLinear<float>(*backend, config, W), doctest::Contains(expected.c_str()), ConfigError);
  };
  const LoraConfig ok{.in_features = 6, .out_features = 4, .rank = 2};
  LoraConfig bad = ok;
  bad.rank = 0;
  refused({.lora = bad}, "DoraLinear 6 -> 4: rank 0 must be in [1, min(in, out) = 4]");
  bad.rank = 5;
  refused({.lora = bad}, "rank 5");
  bad = ok;
  bad.alpha = std::numeric_limits<double>::quiet_NaN();
  refused({.lora = bad}, "alpha nan");
  refused({.lora = ok, .eps = 0}, "eps 0.000000 must be positive and finite");
  refused({.lora = ok, .eps = -1}, "eps -1.000000");
  refused({.lora = ok, .eps = std::numeric_limits<double>::quiet_NaN()}, "eps nan");
  refused({.lora = ok, .eps = std::numeric_limits<double>::infinity()}, "eps inf");
  refused({.lora = ok, .eps = 1e-60}, "rounds to 0");
  CHECK_THROWS_WITH_AS(DoraLinear<float>(*backend, {.lora = ok}, HostMatrix<float>::Ones(4, 5)),
                       doctest::Contains("[4 x 5]"), ShapeError);
}

TEST_CASE("DoRA: CPU and CUDA agree, both modes, dropout, with and without dX, merge (skipped without a GPU)") {
  if (!testing::cuda_or_skip("DoRA CPU/CUDA parity")) return;
  for (DoraGradient mode : {DoraGradient::detached, DoraGradient::exact}) {
    for (double dropout : {0.0, 0.2}) {
      for (bool with_dX : {true, false}) {
        CAPTURE(int(mode));
        CAPTURE(dropout);
        CAPTURE(with_dX);
        auto cpu = make_backend<float>(Device::cpu);
        auto gpu = make_backend<float>(Device::cuda);
        std::mt19937_64 gen(12);
        const Index n = 37, k = 70, d = 45, r = 4;
        DoraConfig config{.lora = {.in_features = k, .out_features = d, .rank = r, .alpha = 8, .dropout = dropout,
                                   .bias = BiasMode::trainable, .seed = 3},
                          .gradient = mode};
        HostMatrix<float> W = normal_matrix<float>(d, k, gen, 0.2);
        W.row(5).setZero();
        DoraLinear<float> a(*cpu, config, W), b(*gpu, config, W);
        const HostMatrix<float> B = normal_matrix<float>(d, r, gen, 0.1);
        HostMatrix<float> bias = normal_matrix<float>(1, d, gen), m = to_host(*cpu, a.m());
        bias(0, 9) = 1e4f;  // a large bias over a small m: Z's column recomputed (m_5 = 0 too: W_5 = 0)
        m(0, 9) *= 1e-3f;
        for (DoraLinear<float>* layer : {&a, &b}) {
          layer->set_B(B);
          layer->set_b(bias);
          layer->set_m(m);
        }
        const HostMatrix<float> X = normal_matrix<float>(n, k, gen), G = normal_matrix<float>(n, d, gen);
        Tensor<float> Xa = to_backend<float>(*cpu, X, "X"), Xb = to_backend<float>(*gpu, X, "X");
        Tensor<float> Ga = to_backend<float>(*cpu, G, "dY"), Gb = to_backend<float>(*gpu, G, "dY");
        Tensor<float> dXa = cpu->allocate(n, k), dXb = gpu->allocate(n, k);
        const auto close = [](const HostMatrix<float>& x, const HostMatrix<float>& y, const char* what) {
          const double err = relative_error(x.cast<double>(), y.cast<double>());
          INFO(what << " relative difference " << err);
          CHECK(err <= 1e-5);
        };
        close(to_host(*gpu, b.forward(Xb)), to_host(*cpu, a.forward(Xa)), "Y");
        a.backward(Ga, with_dX ? &dXa : nullptr);
        b.backward(Gb, with_dX ? &dXb : nullptr);
        if (with_dX) close(to_host(*gpu, dXb), to_host(*cpu, dXa), "dX");
        if (dropout == 0) {
          const HostMatrix<float> flags = to_host(*cpu, a.recomputed_columns());
          CHECK(flags(0, 5) == 1);
          CHECK(flags(0, 9) == 1);
          CHECK(flags.sum() == 2);
          CHECK(to_host(*gpu, b.recomputed_columns()) == flags);
        }
        close(to_host(*gpu, b.dA()), to_host(*cpu, a.dA()), "dA");
        close(to_host(*gpu, b.dB()), to_host(*cpu, a.dB()), "dB");
        close(to_host(*gpu, b.dm()), to_host(*cpu, a.dm()), "dm");
        close(to_host(*gpu, b.db()), to_host(*cpu, a.db()), "db");
        a.merge();
        b.merge();
        close(to_host(*gpu, b.W()), to_host(*cpu, a.W()), "merged W");
        a.reinit();
        b.reinit();
        close(to_host(*gpu, b.m()), to_host(*cpu, a.m()), "m after reinit");
      }
    }
  }
}
