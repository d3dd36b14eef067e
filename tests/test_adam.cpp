// Adam and AdamW steps against values computed by hand; LoRA+ groups; state reset and pruning;
// save_state and restore_state (bit-exact continuation, refusals that change nothing).
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <string>

#include "relora/relora.hpp"

using namespace relora;

namespace {

// One parameter tensor with a gradient the test sets by hand.
struct HandParameter {
  Tensor<double> value, grad;
  Parameter<double> param;
  HandParameter(Backend<double>& backend, const std::string& name, ParamRole role, std::vector<double> p,
                std::vector<double> g) {
    value = backend.allocate(1, Index(p.size()));
    grad = backend.allocate(1, Index(g.size()));
    backend.upload(p.data(), value);
    backend.upload(g.data(), grad);
    param = {name, role, &value, &grad};
  }
  double at(Index i) const { return value.data()[i]; }
  void set_grad(std::vector<double> g) { std::copy(g.begin(), g.end(), grad.data()); }
};

}  // namespace

TEST_CASE("Adam: two steps equal the formula worked by hand") {
  auto backend = make_backend<double>(Device::cpu);
  HandParameter w(*backend, "w", ParamRole::lora_A, {1.0, -2.0}, {0.5, -1.0});
  Adam<double> adam(backend, std::vector<Parameter<double>>{w.param}, AdamConfig{.lr = 0.1, .eps = 1e-8});
  adam.step();
  // t = 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2, update = lr g / (|g| + eps)
  CHECK(w.at(0) == doctest::Approx(1.0 - 0.1 * 0.5 / (0.5 + 1e-8)).epsilon(1e-15));
  CHECK(w.at(1) == doctest::Approx(-2.0 + 0.1 * 1.0 / (1.0 + 1e-8)).epsilon(1e-15));
  w.set_grad({0.25, 2.0});
  adam.step();
  // t = 2, element 0: m = 0.9 * 0.05 + 0.1 * 0.25 = 0.07, v = 0.999 * 0.00025 + 0.001 * 0.0625
  const double m0 = 0.07, v0 = 0.999 * 0.00025 + 0.001 * 0.0625;
  const double m_hat = m0 / (1 - 0.81), v_hat = v0 / (1 - 0.999 * 0.999);
  const double after_first = 1.0 - 0.1 * 0.5 / (0.5 + 1e-8);
  CHECK(w.at(0) == doctest::Approx(after_first - 0.1 * m_hat / (std::sqrt(v_hat) + 1e-8)).epsilon(1e-14));
  CHECK(adam.update_count(0).data()[0] == 2);
  CHECK(adam.m(0).data()[0] == doctest::Approx(m0).epsilon(1e-15));
  CHECK(adam.v(0).data()[0] == doctest::Approx(v0).epsilon(1e-15));
}

// The bias corrections 1 - beta^t come from repeated squaring (the same bits on every device), not
// from pow: one step from a restored count t with a zero gradient moves p by
// lr (beta1 m / c1) / (sqrt(beta2 v / c2) + eps), here against std::pow's corrections.
TEST_CASE("Adam: bias corrections at counts from 1 to ten million agree with pow's to 1e-13") {
  auto backend = make_backend<double>(Device::cpu);
  const double beta1 = 0.9, beta2 = 0.999, lr = 0.1, eps = 1e-8, m = 0.3, v = 0.04;
  for (const double count : {0.0, 1.0, 2.0, 6.0, 99.0, 1000.0, 4095.0, 123456.0, 9999999.0}) {
    HandParameter w(*backend, "w", ParamRole::lora_A, {1.0}, {0.0});
    Adam<double> adam(backend, std::vector<Parameter<double>>{w.param},
                      AdamConfig{.lr = lr, .beta1 = beta1, .beta2 = beta2, .eps = eps});
    StateDict<double> state;
    adam.save_state(state);
    state.set_tensor("w.m", HostMatrix<double>::Constant(1, 1, m));
    state.set_tensor("w.v", HostMatrix<double>::Constant(1, 1, v));
    state.set_tensor("w.step", HostMatrix<double>::Constant(1, 1, count));
    state.set("steps_taken", std::int64_t(count));
    adam.restore_state(state);
    adam.step();
    const double t = count + 1;
    const double m_hat = beta1 * m / (1 - std::pow(beta1, t)), v_hat = beta2 * v / (1 - std::pow(beta2, t));
    const double expected = lr * m_hat / (std::sqrt(v_hat) + eps);
    INFO("count " << count);
    CHECK(std::abs((1.0 - w.at(0)) - expected) <= 1e-13 * expected);
  }
}

TEST_CASE("AdamW decays the weight apart from the gradient; Adam adds it to the gradient") {
  auto backend = make_backend<double>(Device::cpu);
  HandParameter decoupled(*backend, "w", ParamRole::lora_A, {2.0}, {0.5});
  Adam<double> adamw(backend, std::vector<Parameter<double>>{decoupled.param},
                     AdamConfig{.lr = 0.1, .weight_decay = 0.01, .decoupled_weight_decay = true});
  adamw.step();
  CHECK(decoupled.at(0) == doctest::Approx(2.0 - 0.1 * 0.01 * 2.0 - 0.1 * 0.5 / (0.5 + 1e-8)).epsilon(1e-15));

  HandParameter coupled(*backend, "w", ParamRole::lora_A, {2.0}, {0.5});
  Adam<double> adam(backend, std::vector<Parameter<double>>{coupled.param},
                    AdamConfig{.lr = 0.1, .weight_decay = 0.5, .decoupled_weight_decay = false});
  adam.step();
  const double g = 0.5 + 0.5 * 2.0;  // L2: the decay joins the gradient, then is normalised with it
  CHECK(coupled.at(0) == doctest::Approx(2.0 - 0.1 * g / (g + 1e-8)).epsilon(1e-15));
}

TEST_CASE("LoRA+ groups give B lr x ratio and the schedule factor scales every group") {
  auto backend = make_backend<double>(Device::cpu);
  HandParameter a(*backend, "l.lora_A", ParamRole::lora_A, {0.0}, {1.0});
  HandParameter b(*backend, "l.lora_B", ParamRole::lora_B, {0.0}, {1.0});
  HandParameter bias(*backend, "l.bias", ParamRole::bias, {0.0}, {1.0});
  auto groups = lora_plus_groups<double>({a.param, b.param, bias.param}, 0.01, 16);
  REQUIRE(groups.size() == 2);
  CHECK(groups[1].lr == doctest::Approx(0.16));
  Adam<double> adam(backend, groups, AdamConfig{.eps = 1e-12});
  adam.step(0.5);  // the first Adam step moves each entry by lr * factor
  CHECK(a.at(0) == doctest::Approx(-0.005).epsilon(1e-9));
  CHECK(bias.at(0) == doctest::Approx(-0.005).epsilon(1e-9));
  CHECK(b.at(0) == doctest::Approx(-0.08).epsilon(1e-9));
}

TEST_CASE("reset_state zeroes m, v and the count of the chosen parameters only") {
  auto backend = make_backend<double>(Device::cpu);
  HandParameter a(*backend, "A", ParamRole::lora_A, {1, 2, 3}, {0.1, 0.2, 0.3});
  HandParameter w(*backend, "W", ParamRole::base_weight, {1, 2}, {0.5, 0.5});
  Adam<double> adam(backend, std::vector<Parameter<double>>{a.param, w.param}, AdamConfig{.lr = 0.01});
  adam.step();
  adam.step();
  adam.reset_state([](const Parameter<double>& p) { return p.role == ParamRole::lora_A; });
  for (Index i = 0; i < 3; ++i) {
    CHECK(adam.m(0).data()[i] == 0);
    CHECK(adam.v(0).data()[i] == 0);
  }
  CHECK(adam.update_count(0).data()[0] == 0);
  CHECK(adam.update_count(1).data()[0] == 2);
  CHECK(adam.m(1).data()[0] != 0);
  // After a reset the next update is bias-corrected as a first one: a move of exactly lr.
  const double before = a.at(0);
  adam.step();
  CHECK(before - a.at(0) == doctest::Approx(0.01).epsilon(1e-6));
}

TEST_CASE("prune_state zeroes the given fraction, the smallest or random entries, keeping counts") {
  auto backend = make_backend<double>(Device::cpu);
  std::vector<double> g(100);
  for (int i = 0; i < 100; ++i) g[std::size_t(i)] = (i % 2 ? 1 : -1) * (1 + i);
  HandParameter a(*backend, "A", ParamRole::lora_A, std::vector<double>(100, 0.0), g);
  Adam<double> adam(backend, std::vector<Parameter<double>>{a.param});
  adam.step();
  const auto all = [](const Parameter<double>&) { return true; };
  adam.prune_state(all, 0.3, PruneMode::magnitude);
  int zeros = 0;
  for (int i = 0; i < 100; ++i) {
    const bool zero = adam.m(0).data()[i] == 0;
    zeros += zero;
    CHECK(zero == (i < 30));  // |g| grows with i, so the 30 smallest are the first 30
    CHECK((adam.v(0).data()[i] == 0) == (i < 30));
  }
  CHECK(zeros == 30);
  CHECK(adam.update_count(0).data()[0] == 1);

  adam.step();
  adam.prune_state(all, 0.5, PruneMode::random, 99);
  zeros = 0;
  int zeros_among_large = 0;
  for (int i = 0; i < 100; ++i) {
    zeros += adam.m(0).data()[i] == 0;
    zeros_among_large += i >= 50 && adam.m(0).data()[i] == 0;
  }
  CHECK(zeros == 50);
  CHECK(zeros_among_large > 10);  // random, not by magnitude
  CHECK_THROWS_AS(adam.prune_state(all, 1.5, PruneMode::random), ConfigError);
}

TEST_CASE("magnitude pruning zeroes the same entries of m and v, chosen by |m|") {
  auto backend = make_backend<double>(Device::cpu);
  std::vector<double> g1(40), g2(40);
  for (int i = 0; i < 40; ++i) {
    g1[std::size_t(i)] = 1.0 + i;         // v is led by the first gradient...
    g2[std::size_t(i)] = -(1.0 + i) * 1.5 + (i % 3) * 4.0;  // ...while m's order is shuffled by the second
  }
  HandParameter a(*backend, "A", ParamRole::lora_A, std::vector<double>(40, 0.0), g1);
  Adam<double> adam(backend, std::vector<Parameter<double>>{a.param});
  adam.step();
  a.set_grad(g2);
  adam.step();
  const HostMatrix<double> m_before = Eigen::Map<const HostMatrix<double>>(adam.m(0).data(), 1, 40);
  adam.prune_state([](const Parameter<double>&) { return true; }, 0.5, PruneMode::magnitude);
  int zeros = 0;
  double largest_pruned = 0, smallest_kept = 1e300;
  for (int i = 0; i < 40; ++i) {
    const bool zero = adam.m(0).data()[i] == 0;
    zeros += zero;
    CHECK(zero == (adam.v(0).data()[i] == 0));
    (zero ? largest_pruned : smallest_kept) =
        zero ? std::max(largest_pruned, std::abs(m_before(0, i))) : std::min(smallest_kept, std::abs(m_before(0, i)));
  }
  CHECK(zeros == 20);
  CHECK(largest_pruned <= smallest_kept);
}

namespace {

// Every tensor and field of a saved state, to compare two states exactly.
bool same_state(const StateDict<double>& a, const StateDict<double>& b) {
  if (a.tensors().size() != b.tensors().size() || a.fields() != b.fields()) return false;
  for (const auto& [name, tensor] : a.tensors()) {
    const auto it = b.tensors().find(name);
    if (it == b.tensors().end() || it->second.rows() != tensor.rows() || it->second.cols() != tensor.cols() ||
        it->second != tensor) {
      return false;
    }
  }
  return true;
}

}  // namespace

TEST_CASE("Adam: save_state and restore_state continue bit for bit") {
  auto backend = make_backend<double>(Device::cpu);
  HandParameter a(*backend, "l.lora_A", ParamRole::lora_A, {1, 2, 3}, {0.1, -0.2, 0.3});
  HandParameter b(*backend, "l.lora_B", ParamRole::lora_B, {0.5, -0.5}, {1.0, 2.0});
  Adam<double> adam(backend, std::vector<Parameter<double>>{a.param, b.param}, AdamConfig{.lr = 0.01});
  adam.step();
  adam.step(0.5);
  adam.reset_state([](const Parameter<double>& p) { return p.role == ParamRole::lora_B; });
  adam.step();
  adam.prune_state([](const Parameter<double>&) { return true; }, 0.5, PruneMode::random, 3);
  StateDict<double> saved;
  adam.save_state(saved);
  CHECK(saved.has_tensor("l.lora_A.m"));
  CHECK(saved.has_tensor("l.lora_B.v"));
  CHECK(saved.tensor("l.lora_A.step", 1, 1)(0, 0) == 3);
  CHECK(saved.tensor("l.lora_B.step", 1, 1)(0, 0) == 1);  // reset after two steps
  CHECK(saved.integer("steps_taken") == 3);
  CHECK(saved.unsigned_integer("prune_draws") == 2);

  // A second optimizer over copies of the parameters takes the state over and then moves exactly
  // as the first: same values after two more steps (and a random prune: the draws travel).
  HandParameter a2(*backend, "l.lora_A", ParamRole::lora_A, {a.at(0), a.at(1), a.at(2)}, {0.1, -0.2, 0.3});
  HandParameter b2(*backend, "l.lora_B", ParamRole::lora_B, {b.at(0), b.at(1)}, {1.0, 2.0});
  Adam<double> resumed(backend, std::vector<Parameter<double>>{a2.param, b2.param}, AdamConfig{.lr = 0.01});
  resumed.restore_state(saved);
  CHECK(resumed.steps_taken() == 3);
  StateDict<double> again;
  resumed.save_state(again);
  CHECK(same_state(saved, again));
  for (Adam<double>* opt : {&adam, &resumed}) {
    opt->step(0.7);
    opt->prune_state([](const Parameter<double>&) { return true; }, 0.5, PruneMode::random, 3);
    opt->step();
  }
  for (Index i = 0; i < 3; ++i) CHECK(a.at(i) == a2.at(i));
  for (Index i = 0; i < 2; ++i) CHECK(b.at(i) == b2.at(i));
  StateDict<double> first, second;
  adam.save_state(first);
  resumed.save_state(second);
  CHECK(same_state(first, second));
}

TEST_CASE("Adam: restore_state refuses a bad state, naming the entry, and changes nothing") {
  auto backend = make_backend<double>(Device::cpu);
  HandParameter a(*backend, "A", ParamRole::lora_A, {1, 2, 3}, {0.1, -0.2, 0.3});
  Adam<double> adam(backend, std::vector<Parameter<double>>{a.param}, AdamConfig{.lr = 0.01});
  adam.step();
  adam.step();
  StateDict<double> good;
  adam.save_state(good);

  const auto refused = [&](const std::function<void(StateDict<double>&)>& edit, const std::string& expected) {
    StateDict<double> bad = good;
    bad.set_origin("optim.");
    edit(bad);
    INFO("expected: " << expected);
    CHECK_THROWS_WITH_AS(adam.restore_state(bad), doctest::Contains(expected.c_str()), IoError);
    StateDict<double> now;
    adam.save_state(now);
    CHECK(same_state(now, good));  // nothing changed
    CHECK(adam.steps_taken() == 2);
  };
  const auto with_tensor = [](const std::string& name, HostMatrix<double> value) {
    return [name, value](StateDict<double>& s) { s.set_tensor(name, value); };
  };
  HostMatrix<double> wrong_shape(1, 2);
  wrong_shape << 0, 0;
  HostMatrix<double> with_nan(1, 3);
  with_nan << 0, std::nan(""), 0;
  HostMatrix<double> negative_v(1, 3);
  negative_v << 1e-4, -1e-9, 1e-4;
  HostMatrix<double> count(1, 1);
  count << 2.5;
  HostMatrix<double> large_count(1, 1);
  large_count << 7;
  // The first entries restore well, the bad one comes last: still nothing may change.
  refused(with_tensor("A.v", wrong_shape), "tensor 'optim.A.v' has shape [1 x 2], expected [1 x 3]");
  refused(with_tensor("A.m", with_nan), "tensor 'optim.A.m' holds NaN or Inf");
  refused(with_tensor("A.v", negative_v), "tensor 'optim.A.v' holds a negative second moment");
  refused(with_tensor("A.step", count), "tensor 'optim.A.step' holds update count 2.5");
  refused(with_tensor("A.step", large_count), "not a whole number in [0, steps_taken = 2]");
  refused(with_tensor("B.m", wrong_shape), "tensor 'optim.B.m' belongs to no parameter of this optimizer");
  refused([](StateDict<double>& s) { s.set("steps_taken", std::int64_t(-1)); }, "field 'steps_taken' is -1");
  refused([](StateDict<double>& s) { s.set("prune_draws", std::string("x")); }, "field 'prune_draws'");
  {
    StateDict<double> missing;
    missing.set("steps_taken", std::int64_t(2));
    missing.set("prune_draws", std::uint64_t(0));
    missing.set_tensor("A.m", good.tensors().at("A.m"));
    CHECK_THROWS_WITH_AS(adam.restore_state(missing), doctest::Contains("tensor 'A.v' is missing"), IoError);
  }
}
