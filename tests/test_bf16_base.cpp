// A base weight stored in bf16 or fp16 (FrozenBase): the format conversions, the layer against an
// fp32 reference holding the same rounded weights, finite differences of the fp32 parts, the
// three ways a merge lands in a 16-bit W, full fine-tuning through the fp32 master, saved state
// bit for bit, and safetensors files kept in their dtype.
//
// Tolerances. On the CPU a 16-bit base is widened exactly and multiplied in fp32, so the layer
// must agree with an fp32 layer on the rounded weights to fp32 rounding: relative error 1e-5.
// Rounding a value to bf16 (fp16) moves it by at most u = 2^-8 (2^-11) of itself; where a test
// compares against the unrounded fp32 values, the bound is u (relative, entry by entry).
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <random>

#include "bf16_test_util.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::HalfAndReference;
using relora::testing::normal_matrix;
using relora::testing::rounded;
using relora::testing::what_of;

namespace {

double rel(const HostMatrix<float>& a, const HostMatrix<float>& b) {
  return double((a - b).norm()) / std::max(double(b.norm()), 1e-30);
}

std::shared_ptr<Backend<float>> cpu() { return make_backend<float>(Device::cpu); }

}  // namespace

TEST_CASE("bf16 and fp16: every finite 16-bit value widens exactly and rounds back to itself") {
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    int checked = 0;
    for (std::uint32_t h = 0; h < 0x10000u; ++h) {
      const auto bits = std::uint16_t(h);
      if (half_bits::is_nan_or_inf(bits, format)) continue;
      const float x = half_bits::half_to_float(bits, format);
      const std::uint16_t back = half_bits::round_float(x, format, HalfRounding::nearest, 0.0f);
      // -0 and +0 are distinct bits and both round back to themselves
      if (back != bits) FAIL_CHECK(precision_name(format) << " bits " << h << " -> " << x << " -> " << back);
      ++checked;
    }
    CHECK(checked > 60000);
  }
  // fp16 by its definition: 1, the largest finite, the smallest subnormal
  CHECK(half_bits::fp16_to_float(0x3C00) == 1.0f);
  CHECK(half_bits::fp16_to_float(0x7BFF) == 65504.0f);
  CHECK(half_bits::fp16_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(half_bits::bf16_to_float(0x3F80) == 1.0f);
}

TEST_CASE("bf16 and fp16 round to nearest, ties to even, and saturate") {
  // bf16 near 1: spacing 2^-7. 1 + 2^-8 is a tie between 1 (even) and 1 + 2^-7.
  const auto bf = [](float x) { return half_bits::round_float(x, BasePrecision::bf16, HalfRounding::nearest, 0); };
  CHECK(bf(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);
  CHECK(bf(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);  // tie between 0x3F81 and 0x3F82: even
  CHECK(bf(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)) == 0x3F81);
  CHECK(bf(-1.0f - std::ldexp(1.0f, -8) - std::ldexp(1.0f, -20)) == 0xBF81);
  const auto hf = [](float x) { return half_bits::round_float(x, BasePrecision::fp16, HalfRounding::nearest, 0); };
  CHECK(hf(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
  CHECK(hf(1e6f) == 0x7BFF);                        // saturates at 65504
  CHECK(hf(std::ldexp(1.0f, -25)) == 0x0000);       // half the smallest subnormal: tie to even 0
  CHECK(hf(std::ldexp(1.5f, -25)) == 0x0001);
  // The rounding error is at most u = 2^-8 (bf16), 2^-11 (fp16) relative, over many values.
  std::mt19937_64 gen(3);
  std::normal_distribution<float> normal(0, 10);
  for (int i = 0; i < 10000; ++i) {
    const float x = normal(gen);
    CHECK(std::fabs(half_bits::bf16_to_float(bf(x)) - x) <= std::ldexp(1.0f, -8) * std::fabs(x));
    CHECK(std::fabs(half_bits::fp16_to_float(hf(x)) - x) <= std::ldexp(1.0f, -11) * std::fabs(x));
  }
}

TEST_CASE("bf16_nearest, the casts' rounding, equals round_float to nearest") {
  // Every 257th bit pattern, and densely where the two could part: every tie and its neighbours
  // (low 16 bits 0x7FFF, 0x8000, 0x8001 under every high half), every 7th of the subnormals and
  // smallest normals, every 3rd of the top binades with Inf and NaN.
  std::size_t checked = 0, differ = 0;
  const auto check = [&](std::uint32_t bits) {
    const float x = half_bits::bits_float(bits);
    const auto fast = half_bits::bf16_nearest(x);
    const auto reference = half_bits::round_float(x, BasePrecision::bf16, HalfRounding::nearest, 0.0f);
    if (fast != reference && differ++ < 5) MESSAGE("bits " << bits << ": " << fast << " against " << reference);
    ++checked;
  };
  for (std::uint64_t bits = 0; bits < (std::uint64_t(1) << 32); bits += 257) check(std::uint32_t(bits));
  for (std::uint32_t high = 0; high < 0x10000u; ++high) {
    for (const std::uint32_t low : {0x7FFFu, 0x8000u, 0x8001u}) check(high << 16 | low);
  }
  for (const std::uint32_t sign : {0u, 0x80000000u}) {
    for (std::uint32_t m = 0; m < 0x01000000u; m += 7) check(sign | m);                     // around 2^-126
    for (std::uint32_t m = 0x7F700000u; m <= 0x7FFFFFFFu; m += 3) check(sign | m);  // top, Inf, NaN
  }
  MESSAGE(checked << " floats, " << differ << " differ");
  CHECK(differ == 0);
}

TEST_CASE("stochastic rounding to bf16 and fp16 is unbiased and reproducible") {
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    // x a third of the way between two neighbours: up with probability 1/3.
    const float low = 1.0f, spacing = format == BasePrecision::bf16 ? std::ldexp(1.0f, -7) : std::ldexp(1.0f, -10);
    const float x = low + spacing / 3;
    const int draws = 200000;
    double sum = 0;
    const RngKey key{7, 1};
    for (int i = 0; i < draws; ++i) {
      const std::uint16_t r =
          half_bits::round_float(x, format, HalfRounding::stochastic, half_bits::rounding_uniform(key, i));
      const float v = half_bits::half_to_float(r, format);
      CHECK((v == low || v == low + spacing));
      sum += v;
    }
    // The mean's standard deviation is spacing sqrt(p (1 - p) / draws); allow 5 of them.
    const double sd = spacing * std::sqrt((1.0 / 3) * (2.0 / 3) / draws);
    MESSAGE(std::string(precision_name(format)) << ": mean - x = " << sum / draws - x << " (sd " << sd << ")");
    CHECK(std::fabs(sum / draws - x) < 5 * sd);
  }
  // The same key and index: the same bits, on any device (element i is a pure function of both).
  const float u1 = half_bits::rounding_uniform(RngKey{1, 2}, 12345);
  const float u2 = half_bits::rounding_uniform(RngKey{1, 2}, 12345);
  CHECK(u1 == u2);
  CHECK(u1 >= 0.0f);
  CHECK(u1 < 1.0f);
}

TEST_CASE("bf16 and fp16 base: forward and every gradient match an fp32 layer on the same rounded weights (CPU)") {
  auto backend = cpu();
  std::mt19937_64 gen(11);
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    for (const BiasMode bias : {BiasMode::none, BiasMode::frozen, BiasMode::trainable}) {
      for (const Index d : {Index(7), Index(300)}) {  // one panel of W, and several (CPU panels of 2^20 elements)
        const Index k = d == 7 ? 13 : 4000;
        const LoraConfig config{.in_features = k, .out_features = d, .rank = 4, .alpha = 8, .bias = bias, .seed = 5};
        HalfAndReference layers(*backend, config, format, gen);
        CHECK(layers.half->base().precision() == format);
        CHECK(std::string(layers.half->implementation()) == "reference");
        const Index n = 9;
        const HostMatrix<float> x = normal_matrix<float>(n, k, gen), dy = normal_matrix<float>(n, d, gen);
        // A backward may use its dY as scratch (Layer::backward): one copy each.
        Tensor<float> X = to_backend<float>(*backend, x, "X"), dY = to_backend<float>(*backend, dy, "dY");
        Tensor<float> dY_ref = to_backend<float>(*backend, dy, "dY");
        const HostMatrix<float> y_half = to_host(*backend, layers.half->forward(X));
        const HostMatrix<float> y_ref = to_host(*backend, layers.reference->forward(X));
        layers.half->backward(dY, true);
        layers.reference->backward(dY_ref, true);
        const double e_y = rel(y_half, y_ref), e_dx = rel(to_host(*backend, layers.half->dX()),
                                                          to_host(*backend, layers.reference->dX()));
        const double e_da = rel(to_host(*backend, layers.half->dA()), to_host(*backend, layers.reference->dA()));
        const double e_db = rel(to_host(*backend, layers.half->dB()), to_host(*backend, layers.reference->dB()));
        MESSAGE(std::string(precision_name(format)) << " d " << d << " bias " << int(bias) << ": Y " << e_y
                                                    << ", dX " << e_dx << ", dA " << e_da << ", dB " << e_db);
        CHECK(e_y <= 1e-5);
        CHECK(e_dx <= 1e-5);
        CHECK(e_da <= 1e-5);
        CHECK(e_db <= 1e-5);
        if (bias == BiasMode::trainable) {
          CHECK(rel(to_host(*backend, layers.half->db()), to_host(*backend, layers.reference->db())) <= 1e-6);
        }
      }
    }
  }
}

TEST_CASE("bf16 base: finite differences of the fp32 parts (A, B, trainable bias, X)") {
  // L = sum(Y .* G) is linear in each of A, B, b and X, so central differences are exact up to
  // fp32 rounding of Y: with h = 1e-2 and |Y| ~ 1 the difference quotient carries about
  // 1e-7 / 1e-2 = 1e-5 absolute error per entry; the check allows 1e-3 relative.
  auto backend = cpu();
  std::mt19937_64 gen(21);
  const Index n = 5, k = 6, d = 4, r = 2;
  const LoraConfig config{.in_features = k, .out_features = d, .rank = r, .alpha = 3, .bias = BiasMode::trainable,
                          .seed = 9, .base_precision = BasePrecision::bf16};
  auto layer = make_lora_linear<float>(*backend, config, normal_matrix<float>(d, k, gen, 0.5));
  layer->set_B(normal_matrix<float>(d, r, gen, 0.5));
  HostMatrix<float> x = normal_matrix<float>(n, k, gen);
  const HostMatrix<float> G = normal_matrix<float>(n, d, gen);
  Tensor<float> X = to_backend<float>(*backend, x, "X"), dY = to_backend<float>(*backend, G, "G");
  const auto loss = [&]() {
    const HostMatrix<float> y = to_host(*backend, layer->forward(X));
    return double((y.cast<double>().array() * G.cast<double>().array()).sum());
  };
  loss();
  layer->backward(dY, true);
  const HostMatrix<float> dA = to_host(*backend, layer->dA()), dB = to_host(*backend, layer->dB());
  const HostMatrix<float> db = to_host(*backend, layer->db()), dX = to_host(*backend, layer->dX());
  const auto numeric = [&](HostMatrix<float> value, const std::function<void(const HostMatrix<float>&)>& set) {
    HostMatrix<float> grad(value.rows(), value.cols());
    const float h = 1e-2f;
    for (Index i = 0; i < value.size(); ++i) {
      const float saved = value.data()[i];
      value.data()[i] = saved + h;
      set(value);
      const double up = loss();
      value.data()[i] = saved - h;
      set(value);
      const double down = loss();
      value.data()[i] = saved;
      set(value);
      grad.data()[i] = float((up - down) / (2 * double(h)));
    }
    return grad;
  };
  using Set = std::function<void(const HostMatrix<float>&)>;
  const Set set_A = [&](const HostMatrix<float>& v) { layer->set_A(v); };
  const Set set_B = [&](const HostMatrix<float>& v) { layer->set_B(v); };
  const Set set_b = [&](const HostMatrix<float>& v) { layer->set_b(v); };
  const double e_a = rel(dA, numeric(to_host(*backend, layer->A()), set_A));
  const double e_b = rel(dB, numeric(to_host(*backend, layer->B()), set_B));
  const double e_bias = rel(db, numeric(to_host(*backend, layer->b()), set_b));
  const double e_x = rel(dX, numeric(x, [&](const HostMatrix<float>& v) { upload<float>(*backend, v, X, "X"); }));
  MESSAGE("finite differences, relative error: dA " << e_a << ", dB " << e_b << ", db " << e_bias << ", dX " << e_x);
  CHECK(e_a <= 1e-3);
  CHECK(e_b <= 1e-3);
  CHECK(e_bias <= 1e-3);
  CHECK(e_x <= 1e-3);
}

TEST_CASE("bf16 base stores W in 2 bytes per weight, and W() needs the fp32 master") {
  auto backend = cpu();
  std::mt19937_64 gen(1);
  const LoraConfig fp32{.in_features = 64, .out_features = 32, .rank = 4};
  LoraConfig bf16 = fp32;
  bf16.base_precision = BasePrecision::bf16;
  LoraConfig master = bf16;
  master.base_merge = BaseMerge::fp32_master;
  LoraLinear<float> a(*backend, fp32), b(*backend, bf16), c(*backend, master);
  CHECK(a.base().weight_bytes() == 64 * 32 * 4);
  CHECK(b.base().weight_bytes() == 64 * 32 * 2);
  CHECK(c.base().weight_bytes() == 64 * 32 * 6);
  CHECK(what_of([&] { (void)b.W(); }).find("stored in bf16 with no fp32 master") != std::string::npos);
  CHECK(c.W().rows() == 32);
  // A weight beyond fp16's range is refused, not saturated.
  LoraConfig fp16 = fp32;
  fp16.base_precision = BasePrecision::fp16;
  LoraLinear<float> h(*backend, fp16);
  HostMatrix<float> big = HostMatrix<float>::Zero(32, 64);
  big(2, 3) = 1e5f;
  const std::string range_message = what_of([&] { h.set_W(big); });
  MESSAGE(range_message);
  CHECK(range_message.find("100000.000000 at (2, 3) is beyond fp16's largest value") != std::string::npos);
  // double layers have no 16-bit base
  auto dbl = make_backend<double>(Device::cpu);
  const LoraConfig dconfig{.in_features = 4, .out_features = 3, .rank = 1, .base_precision = BasePrecision::fp16};
  CHECK(what_of([&] { LoraLinear<double> d(*dbl, dconfig); }).find("needs a float layer") != std::string::npos);
}

namespace {

// A rank-1 adapter whose s B A is `update` everywhere, on a d x k base of ones.
std::unique_ptr<LoraLinear<float>> ones_with_update(Backend<float>& backend, BaseMerge merge, float update,
                                                    std::uint64_t seed = 3) {
  const Index d = 64, k = 128;
  const LoraConfig config{.in_features = k, .out_features = d, .rank = 1, .alpha = 1, .seed = seed,
                          .base_precision = BasePrecision::bf16, .base_merge = merge};
  auto layer = make_lora_linear<float>(backend, config, HostMatrix<float>::Ones(d, k));
  layer->set_A(HostMatrix<float>::Constant(1, k, 1.0f));
  layer->set_B(HostMatrix<float>::Constant(d, 1, update));
  return layer;
}

}  // namespace

TEST_CASE("merges into a bf16 W: nearest loses small updates, stochastic keeps them on average, the master exactly") {
  auto backend = cpu();
  // bf16's spacing at 1 is 2^-7 = 0.0078; an update of 0.001 is an eighth of it.
  const float update = 0.001f;
  auto nearest = ones_with_update(*backend, BaseMerge::nearest, update);
  nearest->merge();
  CHECK(nearest->base().weight_host().maxCoeff() == 1.0f);
  CHECK(nearest->base().weight_host().minCoeff() == 1.0f);

  auto stochastic = ones_with_update(*backend, BaseMerge::stochastic, update);
  stochastic->merge();
  const HostMatrix<float> Ws = stochastic->base().weight_host();
  const double mean = Ws.cast<double>().mean();
  // Each entry is 1 or 1 + 2^-7, up with probability update / 2^-7; the mean of 8192 such
  // entries has standard deviation 2^-7 sqrt(p (1 - p) / 8192) = 2.9e-5.
  MESSAGE("stochastic merge: mean W - 1 = " << mean - 1 << " (update " << update << ")");
  CHECK(std::fabs(mean - 1.0 - update) < 1.5e-4);
  // Reproducible: the same seed gives the same bits; the next merge draws anew.
  auto again = ones_with_update(*backend, BaseMerge::stochastic, update);
  again->merge();
  CHECK(again->base().weight_bits().bits == stochastic->base().weight_bits().bits);
  CHECK(stochastic->base().rounding_stream() == 1);

  auto master = ones_with_update(*backend, BaseMerge::fp32_master, update);
  master->merge();
  CHECK((to_host(*backend, master->W()).array() == 1.0f + update).all());  // the master holds it exactly
  CHECK(master->base().weight_host().maxCoeff() == 1.0f);                 // W rounded to nearest from it
  master->unmerge();
  CHECK((to_host(*backend, master->W()).array() == 1.0f).all());
}

TEST_CASE("a bf16 merge refused for NaN leaves the bits and the rounding stream unchanged") {
  auto backend = cpu();
  for (const BaseMerge merge : {BaseMerge::stochastic, BaseMerge::fp32_master, BaseMerge::nearest}) {
    auto layer = ones_with_update(*backend, merge, 0.5f);
    HostMatrix<float> B = to_host(*backend, layer->B());
    B(3, 0) = NAN;
    CHECK_THROWS_AS(layer->set_B(B), NonFiniteError);  // uploads refuse NaN; an overflow is what reaches merge
    B(3, 0) = 3e38f;
    layer->set_B(B);
    layer->set_A(HostMatrix<float>::Constant(1, 128, 1e30f));
    const auto before = layer->base().weight_bits().bits;
    const std::string message = what_of([&] { layer->merge(); });
    MESSAGE(std::string(base_merge_name(merge)) << ": " << message);
    CHECK(message.find("merge refused") != std::string::npos);
    CHECK(layer->base().weight_bits().bits == before);
    CHECK(layer->base().rounding_stream() == 0);
    CHECK(!layer->merged());
  }
}

TEST_CASE("full fine-tuning of a bf16 W trains its fp32 master and rounds W from it") {
  auto backend = cpu();
  std::mt19937_64 gen(4);
  const LoraConfig config{.in_features = 8, .out_features = 5, .rank = 2, .base_precision = BasePrecision::bf16};
  auto layer = make_lora_linear<float>(*backend, config, normal_matrix<float>(5, 8, gen));
  CHECK(!layer->base().has_master());
  layer->set_train_target(TrainTarget::base);
  REQUIRE(layer->base().has_master());
  auto params = layer->parameters("l");
  REQUIRE(params.size() == 1);
  CHECK(params[0].role == ParamRole::base_weight);
  CHECK(params[0].value == &layer->base().weight());
  // An optimizer step on the master by hand: + 1e-3 everywhere, below bf16's spacing near most values.
  HostMatrix<float> M = to_host(*backend, *params[0].value);
  M.array() += 1e-3f;
  backend->upload(M.data(), *params[0].value);
  const HostMatrix<float> x = normal_matrix<float>(3, 8, gen);
  Tensor<float> X = to_backend<float>(*backend, x, "X");
  const HostMatrix<float> y = to_host(*backend, layer->forward(X));
  const HostMatrix<float> expected = x * rounded(M, BasePrecision::bf16).transpose();
  CHECK(rel(y, expected) <= 1e-6);
  CHECK(to_host(*backend, layer->base().weight()) == M);  // the master keeps what the rounding lost
  // ReLoRA's warm start: W trains, then the adapter. A step of the optimizer after the last
  // forward must reach W when the target changes.
  M.array() += 0.25f;
  backend->upload(M.data(), *params[0].value);
  layer->set_train_target(TrainTarget::adapter);
  CHECK(layer->base().weight_host() == rounded(M, BasePrecision::bf16));
}

TEST_CASE("a bf16 layer's state restores bit for bit; a state of another precision is refused by name") {
  auto backend = cpu();
  std::mt19937_64 gen(8);
  LoraConfig config{.in_features = 16, .out_features = 12, .rank = 3, .bias = BiasMode::frozen, .seed = 2,
                    .base_precision = BasePrecision::bf16};
  auto layer = make_lora_linear<float>(*backend, config, normal_matrix<float>(12, 16, gen));
  layer->set_b(normal_matrix<float>(1, 12, gen));
  layer->set_B(normal_matrix<float>(12, 3, gen, 0.1));
  layer->merge();
  layer->reinit();
  StateDict<float> state;
  layer->save_state(state);
  CHECK(state.has_half_tensor("weight"));
  CHECK(state.has_half_tensor("bias"));
  CHECK(!state.has_tensor("weight"));
  auto fresh = make_lora_linear<float>(*backend, config);
  fresh->restore_state(state);
  CHECK(fresh->base().weight_bits().bits == layer->base().weight_bits().bits);
  CHECK(to_host(*backend, fresh->b()) == to_host(*backend, layer->b()));
  CHECK(fresh->base().rounding_stream() == 1);
  CHECK(to_host(*backend, fresh->A()) == to_host(*backend, layer->A()));

  LoraConfig fp32 = config;
  fp32.base_precision = BasePrecision::fp32;
  auto other = make_lora_linear<float>(*backend, fp32);
  const std::string message = what_of([&] { other->restore_state(state); });
  MESSAGE(message);
  CHECK(message.find("base_precision") != std::string::npos);
  // A 16-bit weight of the wrong shape is named with both shapes.
  StateDict<float> bad = state;
  HalfHostMatrix w = bad.half_tensors().at("weight");
  w.rows = 11;
  w.bits.resize(11 * 16);
  bad.set_half_tensor("weight", w);
  const std::string shape_message = what_of([&] { fresh->restore_state(bad); });
  MESSAGE(shape_message);
  CHECK(shape_message.find("[11 x 16]") != std::string::npos);
  CHECK(shape_message.find("[12 x 16]") != std::string::npos);
}

TEST_CASE("W A^T of a 16-bit base (DoRA's product) equals the double product to fp32 rounding, CPU and CUDA") {
  // A bf16 W on CUDA multiplies A's three bf16 terms on tensor cores; elsewhere W is widened a
  // block of rows at a time. Either way every entry of P = W A^T must be within fp32 summation's
  // bound of the product in double: |P - P_ref| <= 2 k u32 (|W| |A|^T), u32 = 2^-24. A's values
  // span 2^-20 to 2^4, so the terms below the first carry real bits.
  std::vector<std::shared_ptr<Backend<float>>> backends{cpu()};
  if (relora::testing::cuda_or_skip("CUDA W A^T")) backends.push_back(make_backend<float>(Device::cuda));
  const Index d = 300, k = 1000, r = 24;
  std::mt19937_64 gen(31);
  const HostMatrix<float> W = normal_matrix<float>(d, k, gen, 0.5);
  HostMatrix<float> A = normal_matrix<float>(r, k, gen);
  std::uniform_int_distribution<int> exponent(-20, 4);
  for (Index i = 0; i < A.size(); ++i) A.data()[i] = std::ldexp(A.data()[i], exponent(gen));
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    const HostMatrix<double> Wr = rounded(W, format).cast<double>(), Ad = A.cast<double>();
    const HostMatrix<double> reference = Wr * Ad.transpose();
    const HostMatrix<double> bound = 2.0 * double(k) * std::ldexp(1.0, -24) * (Wr.cwiseAbs() * Ad.cwiseAbs().transpose());
    for (const auto& backend : backends) {
      FrozenBase<float> base(*backend, d, k, BiasMode::none, format, BaseMerge::nearest, 5, "W A^T test");
      base.set_weight(W);
      const Tensor<float> At = to_backend<float>(*backend, A, "A");
      Tensor<float> P = backend->allocate(d, r);
      base.weight_times_transposed(At, P);
      const HostMatrix<double> got = to_host(*backend, P).cast<double>();
      double worst = 0;  // the largest error as a fraction of its bound
      for (Index i = 0; i < got.size(); ++i) {
        worst = std::max(worst, std::abs(got.data()[i] - reference.data()[i]) / bound.data()[i]);
      }
      MESSAGE(std::string(precision_name(format)) << " on " << backend->description() << ": worst error " << worst
                                     << " of the bound; relative " << (got - reference).norm() / reference.norm());
      CHECK(worst <= 1.0);
    }
  }
}
