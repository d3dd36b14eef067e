// DoraLinear keeps no Z and no dZ: dm from Z read back from Y, the columns recomputed where that
// is not exact enough (a large frozen bias over a small m) or impossible (m = 0, a zero row of W),
// and the backward with dY scaled in place (dX wanted) or left unscaled (no dX), in float against
// a double reference of the same float parameters.
#include <doctest/doctest.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <utility>

#include "gradient_check.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"

using namespace relora;
using relora::testing::normal_matrix;
using relora::testing::relative_error;

namespace {

struct Reference {
  HostMatrix<double> Z, dm, dA, dB, dX, db;
  HostMatrix<double> dm_scale;  // sum_t |dY_ti Z_ti| / max(n_i, eps): the scale of dm_i's rounding
};

// The detached backward in double, from the layer's float parameters, norms and factors.
Reference reference_of(Backend<float>& backend, const DoraLinear<float>& layer, const HostMatrix<float>& Xf,
                       const HostMatrix<float>& Gf) {
  const auto host = [&](const Tensor<float>& t) { return HostMatrix<double>(to_host(backend, t).cast<double>()); };
  const HostMatrix<double> X = Xf.cast<double>(), G = Gf.cast<double>();
  const HostMatrix<double> W = host(layer.W()), A = host(layer.A()), B = host(layer.B());
  const HostMatrix<double> n = host(layer.norms()), g = host(layer.factors());
  const double s = double(layer.scale()), eps = layer.config().eps;
  Reference ref;
  const HostMatrix<double> U = X * A.transpose();
  ref.Z = X * W.transpose() + s * U * B.transpose();
  const HostMatrix<double> dZ = G * g.row(0).asDiagonal();
  ref.dm.resize(1, W.rows());
  ref.dm_scale.resize(1, W.rows());
  for (Index i = 0; i < W.rows(); ++i) {
    const double norm = std::max(n(0, i), eps);
    ref.dm(0, i) = G.col(i).dot(ref.Z.col(i)) / norm;
    ref.dm_scale(0, i) = G.col(i).cwiseProduct(ref.Z.col(i)).cwiseAbs().sum() / norm;
  }
  ref.dB = s * dZ.transpose() * U;
  const HostMatrix<double> dU = s * dZ * B;
  ref.dA = dU.transpose() * X;
  ref.dX = dZ * W + dU * A;
  ref.db = G.colwise().sum();
  return ref;
}

}  // namespace

TEST_CASE("DoRA dm without a stored Z: read back from Y, recomputed for m = 0, a zero row, a large bias over small m") {
  const Index n = 64, k = 48, d = 8, r = 4;
  enum : Index { plain = 0, zero_m = 1, large_bias = 2, moderate_bias = 3, zero_row = 4 };
  for (bool with_dX : {true, false}) {
    for (DoraGradient mode : {DoraGradient::detached, DoraGradient::exact}) {
      CAPTURE(with_dX);
      CAPTURE(int(mode));
      auto backend = make_backend<float>(Device::cpu);
      std::mt19937_64 gen(31);
      HostMatrix<float> W = normal_matrix<float>(d, k, gen, 0.2);
      W.row(zero_row).setZero();
      DoraConfig config{.lora = {.in_features = k, .out_features = d, .rank = r, .alpha = 8, .bias = BiasMode::frozen,
                                 .seed = 4},
                        .gradient = mode};
      DoraLinear<float> layer(*backend, config, W);
      layer.set_B(normal_matrix<float>(d, r, gen, 0.1));
      HostMatrix<float> m = to_host(*backend, layer.m()), b = normal_matrix<float>(1, d, gen);
      m(0, zero_m) = 0;
      m(0, large_bias) *= 1e-3f;  // g about 1e-3 ...
      b(0, large_bias) = 1e4f;    // ... under a bias whose rounding in Y is about 5e-4: Z read back is off by ~30%
      b(0, moderate_bias) = 3;
      layer.set_m(m);
      layer.set_b(b);
      const HostMatrix<float> X = normal_matrix<float>(n, k, gen), G = normal_matrix<float>(n, d, gen);
      Tensor<float> Xt = to_backend<float>(*backend, X, "X"), dY = to_backend<float>(*backend, G, "dY");
      Tensor<float> dX = backend->allocate(n, k);
      const HostMatrix<double> Y = to_host(*backend, layer.forward(Xt)).cast<double>();
      layer.backward(dY, with_dX ? &dX : nullptr);

      const HostMatrix<float> recomputed = to_host(*backend, layer.recomputed_columns());
      INFO("recomputed columns " << recomputed);
      CHECK(recomputed(0, plain) == 0);
      CHECK(recomputed(0, moderate_bias) == 0);
      CHECK(recomputed(0, zero_m) == 1);
      CHECK(recomputed(0, large_bias) == 1);
      CHECK(recomputed(0, zero_row) == 1);

      const Reference ref = reference_of(*backend, layer, X, G);
      const HostMatrix<double> dm = to_host(*backend, layer.dm()).cast<double>();
      // Within 1e-5 of sum_t |dY_ti Z_ti| / n_i: what a float Z's own rounding allows (the product
      // X W^T's, about sqrt(k) u relative, and dora_recovery.hpp's bound, 66 u, for a column read back).
      for (Index i = 0; i < d; ++i) {
        CAPTURE(i);
        const double err = std::abs(dm(0, i) - ref.dm(0, i)), bound = 1e-5 * ref.dm_scale(0, i) + 1e-30;
        INFO("dm " << dm(0, i) << " reference " << ref.dm(0, i) << " error " << err << " bound " << bound);
        CHECK(err <= bound);
      }
      // Read back from Y, the large-bias column would have been far off: the test has teeth.
      const HostMatrix<double> g = to_host(*backend, layer.factors()).cast<double>();
      const double norm = to_host(*backend, layer.norms())(0, large_bias);
      const double read_back =
          G.col(large_bias).cast<double>().dot(((Y.col(large_bias).array() - double(b(0, large_bias))) /
                                                g(0, large_bias)).matrix()) /
          norm;
      INFO("dm read back from Y " << read_back << " against " << ref.dm(0, large_bias));
      CHECK(std::abs(read_back - ref.dm(0, large_bias)) > 100 * 1e-5 * ref.dm_scale(0, large_bias));

      if (mode == DoraGradient::detached) {
        CHECK(relative_error(to_host(*backend, layer.dB()).cast<double>(), ref.dB) < 1e-5);
        CHECK(relative_error(to_host(*backend, layer.dA()).cast<double>(), ref.dA) < 1e-5);
        if (with_dX) CHECK(relative_error(to_host(*backend, dX).cast<double>(), ref.dX) < 1e-5);
      }
    }
  }
}

TEST_CASE("DoRA: the model's in-place ReLU over Y leaves dm as it was (dY is 0 where ReLU changed Y)") {
  auto backend = make_backend<double>(Device::cpu);
  std::mt19937_64 gen(8);
  const Index n = 6, k = 5, h = 7, d = 3;
  const auto config = [](Index in, Index out) {
    return DoraConfig{.lora = {.in_features = in, .out_features = out, .rank = 2, .bias = BiasMode::trainable}};
  };
  const HostMatrix<double> W1 = normal_matrix(h, k, gen), W2 = normal_matrix(d, h, gen), b1 = normal_matrix(1, h, gen);
  const HostMatrix<double> B1 = normal_matrix(h, 2, gen, 0.5);
  const HostMatrix<double> X = normal_matrix(n, k, gen), G = normal_matrix(n, d, gen);
  Tensor<double> Xt = to_backend<double>(*backend, X, "X");

  // The model: fc1 then ReLU in place over fc1's Y, then fc2.
  Model<double> model(backend);
  auto owned = std::make_unique<DoraLinear<double>>(*backend, config(k, h), W1);
  DoraLinear<double>& fc1 = *owned;
  model.add(std::move(owned), Activation::relu, "fc1");
  model.add(std::make_unique<DoraLinear<double>>(*backend, config(h, d), W2), Activation::identity, "fc2");
  fc1.set_b(b1);
  fc1.set_B(B1);
  Tensor<double> dY = to_backend<double>(*backend, G, "dY");
  model.forward(Xt);
  model.backward(dY);

  // The same layer alone, given the gradient the ReLU passes down.
  DoraLinear<double> alone(*backend, config(k, h), W1);
  alone.set_b(b1);
  alone.set_B(B1);
  const HostMatrix<double> Y = to_host(*backend, alone.forward(Xt));
  auto& fc2 = static_cast<DoraLinear<double>&>(model.layer(1));
  const HostMatrix<double> W2now = to_host(*backend, fc2.W()), A2 = to_host(*backend, fc2.A());
  const HostMatrix<double> g2 = to_host(*backend, fc2.factors());
  const HostMatrix<double> dZ2 = G * g2.row(0).asDiagonal();
  const HostMatrix<double> dH = dZ2 * W2now;  // B2 = 0: dU A adds nothing
  const HostMatrix<double> dY1 = dH.cwiseProduct((Y.array() > 0).cast<double>().matrix());
  Tensor<double> dY1t = to_backend<double>(*backend, dY1, "dY1");
  alone.backward(dY1t, nullptr);
  CHECK((Y.array() < 0).any());
  CHECK(relative_error(to_host(*backend, fc1.dm()), to_host(*backend, alone.dm())) < 1e-12);
  CHECK(relative_error(to_host(*backend, fc1.dB()), to_host(*backend, alone.dB())) < 1e-12);
}
