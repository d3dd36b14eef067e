// The loss of a 16-bit prediction (Loss::compute_half), which spares a model with 16-bit
// activations the fp32 copies of its output and of the loss's gradient. Its definition is the
// model's own path without it (model_half_activations.cpp): widen the output, compute the fp32
// MSE, round its gradient to nearest in the format. So:
// - MseLoss::compute_half's gradient must be those bits exactly, on the CPU and on CUDA; its value
//   is the same sum, the CPU's in the same order (equal bits), CUDA's in another (a few fp32 ulps);
// - a model trained through the Trainer (which takes the 16-bit path) must end with the same
//   parameters, bit for bit, as one whose loss has no 16-bit path.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "half_buffers.hpp"
#include "relora/relora.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::cuda_or_skip;
using relora::testing::download_half_bits;
using relora::testing::upload_half_bits;
using relora::testing::what_of;

namespace {

// An MSE without a 16-bit path (Loss::compute_half's default): the model widens its output for it.
class WideningMse final : public Loss<float> {
 public:
  explicit WideningMse(Backend<float>& backend) : inner_(backend) {}
  const char* name() const override { return "widening mse"; }
  void compute(const Tensor<float>& Y, const Tensor<float>& target) override { inner_.compute(Y, target); }
  const Tensor<float>& gradient() const override { return inner_.gradient(); }
  const Tensor<float>& value_tensor() const override { return inner_.value_tensor(); }
  float value() override { return inner_.value(); }

 private:
  MseLoss<float> inner_;
};

std::vector<std::uint16_t> random_half_bits(Index count, BasePrecision format, std::mt19937_64& gen) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<std::uint16_t> bits(static_cast<std::size_t>(count));
  for (auto& b : bits) b = half_bits::round_float(normal(gen), format, HalfRounding::nearest, 0.0f);
  return bits;
}

HostMatrix<float> random_matrix(Index rows, Index cols, std::mt19937_64& gen) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  HostMatrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = normal(gen);
  return m;
}

// compute_half on `backend` against the definition on the CPU: widen, MseLoss::compute, round.
void check_against_definition(std::shared_ptr<Backend<float>> backend, bool same_order) {
  auto cpu = make_backend<float>(Device::cpu);
  std::mt19937_64 gen(7);
  // One element; a tail after the 8-value accesses; and more than one block (CUDA) and than
  // kParallelElements (the CPU's threads).
  const std::vector<std::pair<Index, Index>> shapes = {{1, 1}, {3, 7}, {5, 33}, {300, 257}, {1024, 513}};
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    for (const auto& [rows, cols] : shapes) {
      CAPTURE(precision_name(format));
      CAPTURE(rows);
      CAPTURE(cols);
      const std::vector<std::uint16_t> y = random_half_bits(rows * cols, format, gen);
      const HostMatrix<float> target = random_matrix(rows, cols, gen);
      HostMatrix<float> wide(rows, cols);
      for (Index i = 0; i < wide.size(); ++i) wide.data()[i] = half_bits::half_to_float(y[std::size_t(i)], format);

      MseLoss<float> reference(*cpu);
      reference.compute(to_backend<float>(*cpu, wide, "Y"), to_backend<float>(*cpu, target, "target"));
      const HostMatrix<float> grad = to_host(*cpu, reference.gradient());
      const float value = reference.value();

      MseLoss<float> loss(*backend);
      const HalfBuffer Y = upload_half_bits(*backend, y, rows, cols);
      REQUIRE(loss.compute_half(Y.tensor(), format, to_backend<float>(*backend, target, "target")));
      REQUIRE(loss.half_gradient(format) != nullptr);
      CHECK(loss.half_gradient(format == BasePrecision::bf16 ? BasePrecision::fp16 : BasePrecision::bf16) == nullptr);
      const std::vector<std::uint16_t> half_grad = download_half_bits(*backend, *loss.half_gradient(format));
      Index differing = 0;
      for (Index i = 0; i < grad.size(); ++i) {
        const std::uint16_t expected = half_bits::round_float(grad.data()[i], format, HalfRounding::nearest, 0.0f);
        differing += half_grad[std::size_t(i)] != expected;
      }
      CHECK(differing == 0);
      if (same_order) {
        CHECK(loss.value() == value);
      } else {
        CHECK(std::abs(double(loss.value()) - double(value)) <= 1e-6 * double(value));
      }
      // gradient() widens the 16-bit gradient: the reference's rounded.
      const HostMatrix<float> widened = to_host(*backend, loss.gradient());
      Index wrong = 0;
      for (Index i = 0; i < grad.size(); ++i) {
        const std::uint16_t expected = half_bits::round_float(grad.data()[i], format, HalfRounding::nearest, 0.0f);
        wrong += widened.data()[i] != half_bits::half_to_float(expected, format);
      }
      CHECK(wrong == 0);
      // An fp32 computation afterwards: no 16-bit gradient any more.
      loss.compute(to_backend<float>(*backend, wide, "Y"), to_backend<float>(*backend, target, "target"));
      CHECK(loss.half_gradient(format) == nullptr);
      CHECK(to_host(*backend, loss.gradient()) == grad);
    }
  }
}

LoraConfig config_of(Index in, Index out, Index rank, BasePrecision base, std::uint64_t seed) {
  return LoraConfig{.in_features = in, .out_features = out, .rank = rank, .alpha = double(2 * rank),
                    .bias = BiasMode::trainable, .seed = seed, .base_precision = base};
}

// Three layers (ReLU, ReLU, then `last`), a bf16 and an fp32 base, activations in `format`.
Model<float> three_layers(std::shared_ptr<Backend<float>> backend, BasePrecision format, Activation last) {
  Model<float> model(std::move(backend));
  model.add(config_of(24, 40, 4, BasePrecision::bf16, 11), Activation::relu);
  model.add(config_of(40, 32, 8, BasePrecision::fp32, 12), Activation::relu);
  model.add(config_of(32, 16, 4, BasePrecision::bf16, 13), last);
  model.set_activation_format(format);
  return model;
}

struct Trained {
  std::vector<HostMatrix<float>> parameters;
  std::vector<float> losses;
};

// Six Trainer steps; `loss` null: the Trainer's own MSE (the 16-bit path).
Trained train(std::shared_ptr<Backend<float>> backend, BasePrecision format, Activation last,
              std::shared_ptr<Loss<float>> loss) {
  Model<float> model = three_layers(backend, format, last);
  Trainer<float> trainer(model, TrainerConfig{.method = TrainingMethod::lora, .adam = {.lr = 1e-2}}, nullptr, loss);
  std::mt19937_64 gen(3);
  const Tensor<float> X = to_backend<float>(*backend, random_matrix(20, 24, gen), "X");
  const Tensor<float> Y = to_backend<float>(*backend, random_matrix(20, 16, gen), "Y");
  Trained run;
  for (int step = 0; step < 6; ++step) {
    trainer.step(X, Y);
    run.losses.push_back(trainer.loss());
  }
  for (const Parameter<float>& p : model.parameters()) run.parameters.push_back(to_host(*backend, *p.value));
  return run;
}

void check_trainer_paths_agree(std::shared_ptr<Backend<float>> backend, bool same_order) {
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    for (const Activation last : {Activation::identity, Activation::relu}) {
      CAPTURE(precision_name(format));
      CAPTURE(last == Activation::relu ? "relu" : "identity");
      const Trained half = train(backend, format, last, nullptr);
      const Trained wide = train(backend, format, last, std::make_shared<WideningMse>(*backend));
      REQUIRE(half.parameters.size() == wide.parameters.size());
      for (std::size_t i = 0; i < half.parameters.size(); ++i) {
        CAPTURE(i);
        CHECK(half.parameters[i] == wide.parameters[i]);
      }
      for (std::size_t step = 0; step < half.losses.size(); ++step) {
        CAPTURE(step);
        if (same_order) {
          CHECK(half.losses[step] == wide.losses[step]);
        } else {
          CHECK(std::abs(double(half.losses[step]) - double(wide.losses[step])) <= 1e-6 * double(wide.losses[step]));
        }
      }
      CHECK(half.losses.back() < half.losses.front());
    }
  }
}

}  // namespace

TEST_CASE("16-bit loss: MseLoss::compute_half gives the definition's gradient bits and value (CPU)") {
  check_against_definition(make_backend<float>(Device::cpu), /*same_order=*/true);
}

TEST_CASE("16-bit loss: MseLoss::compute_half gives the definition's gradient bits, its value to the sum's order (CUDA)") {
  if (!cuda_or_skip("16-bit loss")) return;
  check_against_definition(make_backend<float>(Device::cuda), /*same_order=*/false);
}

TEST_CASE("16-bit loss: Trainer steps through the 16-bit loss equal those through a widened output, bit for bit (CPU)") {
  check_trainer_paths_agree(make_backend<float>(Device::cpu), /*same_order=*/true);
}

TEST_CASE("16-bit loss: Trainer steps through the 16-bit loss equal those through a widened output (CUDA)") {
  if (!cuda_or_skip("16-bit loss")) return;
  check_trainer_paths_agree(make_backend<float>(Device::cuda), /*same_order=*/false);
}

TEST_CASE("16-bit loss: the model's output, the loss's gradient and backward(loss) after the 16-bit path") {
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937_64 gen(5);
  const Tensor<float> X = to_backend<float>(*backend, random_matrix(9, 24, gen), "X");
  const Tensor<float> target = to_backend<float>(*backend, random_matrix(9, 16, gen), "target");
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    CAPTURE(precision_name(format));
    // Adapters that are not zero, so that every gradient is.
    Model<float> fused = three_layers(backend, format, Activation::identity);
    Model<float> plain = three_layers(backend, format, Activation::identity);
    for (Model<float>* m : {&fused, &plain}) {
      for (std::size_t i = 0; i < m->size(); ++i) {
        std::mt19937_64 draw(20 + i);
        m->lora(i).set_B(random_matrix(m->lora(i).out_features(), m->lora(i).rank(), draw) * 0.1f);
      }
    }
    MseLoss<float> loss(*backend), wide_loss(*backend);
    fused.forward_with_loss(X, loss, target);
    REQUIRE(loss.half_gradient(format) != nullptr);
    const HostMatrix<float> expected_output = to_host(*backend, plain.forward(X));
    CHECK(to_host(*backend, fused.output()) == expected_output);  // widened on ask
    wide_loss.compute(plain.output(), target);
    CHECK(loss.value() == wide_loss.value());
    // backward(loss) from the 16-bit gradient equals backward(dY) rounding the fp32 one.
    fused.backward(loss);
    plain.backward(wide_loss.gradient());
    for (std::size_t i = 0; i < fused.size(); ++i) {
      CAPTURE(i);
      CHECK(to_host(*backend, fused.lora(i).dA()) == to_host(*backend, plain.lora(i).dA()));
      CHECK(to_host(*backend, fused.lora(i).dB()) == to_host(*backend, plain.lora(i).dB()));
      CHECK(to_host(*backend, fused.lora(i).db()) == to_host(*backend, plain.lora(i).db()));
    }
    CHECK(to_host(*backend, fused.output()) == expected_output);  // the output survives backward
    // A second backward needs a forward first, from either entry.
    CHECK_THROWS_AS(fused.backward(loss), ConfigError);
  }
}

TEST_CASE("16-bit loss: bad input to compute_half is refused with the shapes, the loss unchanged") {
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937_64 gen(9);
  MseLoss<float> loss(*backend);
  const HalfBuffer Y = upload_half_bits(*backend, random_half_bits(12, BasePrecision::bf16, gen), 3, 4);
  const Tensor<float> target = to_backend<float>(*backend, random_matrix(3, 4, gen), "target");
  const Tensor<float> other = to_backend<float>(*backend, random_matrix(4, 3, gen), "other");
  CHECK(loss.compute_half(Y.tensor(), BasePrecision::bf16, target));
  const float value = loss.value();
  const std::string shapes = what_of([&] { loss.compute_half(Y.tensor(), BasePrecision::bf16, other); });
  CHECK(shapes.find("3 x 4") != std::string::npos);
  CHECK(shapes.find("4 x 3") != std::string::npos);
  CHECK_THROWS_AS(loss.compute_half(Y.tensor(), BasePrecision::bf16, other), ShapeError);
  CHECK_THROWS_AS(loss.compute_half(Y.tensor(), BasePrecision::fp32, target), ConfigError);
  CHECK(loss.value() == value);
  CHECK(loss.half_gradient(BasePrecision::bf16) != nullptr);
  // A model whose output's shape is not the gradient's refuses backward(loss) with both shapes.
  Model<float> model = three_layers(backend, BasePrecision::bf16, Activation::identity);
  model.forward(to_backend<float>(*backend, random_matrix(5, 24, gen), "X"));
  const std::string mismatch = what_of([&] { model.backward(loss); });
  CHECK(mismatch.find("3 x 4") != std::string::npos);
  CHECK(mismatch.find("5 x 16") != std::string::npos);
  // A double loss has no 16-bit path.
  auto cpu_double = make_backend<double>(Device::cpu);
  MseLoss<double> double_loss(*cpu_double);
  CHECK_FALSE(double_loss.compute_half(Y.tensor(), BasePrecision::bf16, to_backend<double>(*cpu_double, HostMatrix<double>::Zero(3, 4), "t")));
  CHECK(double_loss.half_gradient(BasePrecision::bf16) == nullptr);
}
