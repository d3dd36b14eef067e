// A layer that takes its ReLU (Layer::take_output_activation) against a twin that does not: the
// taken ReLU must give ReLU of the twin's output, on every implementation that takes it (the
// reference's base product with the backend's pass after it on the CPU, the product with the ReLU
// in cuBLASLt's epilogue on CUDA for an fp32 or a 16-bit base, the CUDA adapter layer's expand
// pass, DoRA's pass that scales Z into Y), merged or not, with and without a bias; and a model
// whose layers take it must train as one whose layers do not.
//
// Tolerances. Where the taken ReLU runs after the same product as the twin's (the CPU, the expand
// pass, DoRA's scaling pass), the values must be the same bits. cuBLASLt may pick another kernel for a
// product with a ReLU epilogue than for one without, which sums in another order: there each entry
// may differ by fp32 summation over k terms, bounded by 1e-5 of the largest |Y|.
#include <doctest/doctest.h>

#include <functional>
#include <random>
#include <vector>

#include "bf16_test_util.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::cuda_or_skip;
using relora::testing::normal_matrix;

namespace {

std::vector<Device> devices_here() {
  std::vector<Device> devices{Device::cpu};
  if (cuda_or_skip("CUDA part of the output-activation test")) devices.push_back(Device::cuda);
  return devices;
}

// Two layers on the same W, b, A and B: the first took ReLU, the second did not.
struct Twins {
  std::unique_ptr<LoraLinear<float>> taken, plain;
  Twins(Backend<float>& backend, const LoraConfig& config, LayerChoice choice, std::mt19937_64& gen) {
    const HostMatrix<float> W = normal_matrix<float>(config.out_features, config.in_features, gen, 0.3);
    const HostMatrix<float> B = normal_matrix<float>(config.out_features, config.rank, gen, 0.2);
    const HostMatrix<float> b = normal_matrix<float>(1, config.out_features, gen, 0.1);
    taken = make_lora_linear<float>(backend, config, W, choice);
    plain = make_lora_linear<float>(backend, config, W, choice);
    for (LoraLinear<float>* layer : {taken.get(), plain.get()}) {
      layer->set_B(B);
      if (config.bias != BiasMode::none) layer->set_b(b);
    }
    plain->set_A(to_host(backend, taken->A()));
  }
};

}  // namespace

TEST_CASE("a layer that takes its ReLU gives ReLU of its twin's output: every implementation, merged or not") {
  for (const Device device : devices_here()) {
    auto backend = make_backend<float>(device);
    for (const BasePrecision format : {BasePrecision::fp32, BasePrecision::bf16}) {
      for (const LayerChoice choice : {LayerChoice::fastest, LayerChoice::reference}) {
        for (const BiasMode bias : {BiasMode::none, BiasMode::frozen}) {
          // 96 -> 80 at r 8 is within the CUDA adapter layer's passes; the reference choice runs
          // LoraLinear's products (a 16-bit base's through cuBLASLt).
          const LoraConfig config{.in_features = 96, .out_features = 80, .rank = 8, .alpha = 16, .bias = bias,
                                  .seed = 5, .base_precision = format};
          std::mt19937_64 gen(21);
          Twins layers(*backend, config, choice, gen);
          REQUIRE(layers.taken->take_output_activation(Activation::relu));
          CHECK_FALSE(layers.plain->take_output_activation(Activation::tanh));
          CHECK_FALSE(layers.plain->take_output_activation(Activation::gelu));
          CHECK(layers.taken->output_activation() == Activation::relu);
          CHECK(layers.plain->output_activation() == Activation::identity);
          const HostMatrix<float> x = normal_matrix<float>(131, config.in_features, gen);
          const Tensor<float> X = to_backend<float>(*backend, x, "X");
          // A trained-looking B, so that the adapter's term moves Y, then a merge of it too.
          for (const bool merged : {false, true}) {
            if (merged) {
              layers.taken->merge();
              layers.plain->merge();
            }
            const HostMatrix<float> y = to_host(*backend, layers.taken->forward(X));
            const HostMatrix<float> want = to_host(*backend, layers.plain->forward(X)).cwiseMax(0.0f);
            // On CUDA the reference's and a merged layer's products apply the ReLU in cuBLASLt's
            // epilogue; the adapter layer's expand pass and the CPU's pass run after the same product.
            const bool same_product = device == Device::cpu || (choice == LayerChoice::fastest && !merged);
            const double worst = double((y - want).cwiseAbs().maxCoeff());
            const double scale = double(want.cwiseAbs().maxCoeff());
            INFO(std::string(device_name(device)) << " " << std::string(precision_name(format)) << " "
                                                  << layers.taken->implementation()
                                     << std::string(bias == BiasMode::none ? " no bias" : " bias")
                                     << std::string(merged ? " merged" : "") << ": worst " << worst << " of " << scale);
            CHECK(y.minCoeff() >= 0.0f);
            CHECK((y.array() > 0).count() > y.size() / 4);  // the ReLU left a real share positive
            if (same_product) {
              CHECK(worst == 0.0);
            } else {
              CHECK(worst <= 1e-5 * scale);
            }
          }
        }
      }
    }
  }
}

namespace {

// Forwards every call to the layer it holds but declines the activation, so that the model's own
// pass applies it.
struct Declining final : Layer<float> {
  explicit Declining(std::unique_ptr<Layer<float>> inner) : in(std::move(inner)) {}
  std::unique_ptr<Layer<float>> in;
  const char* kind() const override { return in->kind(); }
  const char* implementation() const override { return in->implementation(); }
  Index in_features() const override { return in->in_features(); }
  Index out_features() const override { return in->out_features(); }
  const Tensor<float>& forward(const Tensor<float>& X) override { return in->forward(X); }
  void backward(const Tensor<float>& dY, Tensor<float>* dX) override { in->backward(dY, dX); }
  const Tensor<float>& output() const override { return in->output(); }
  Tensor<float>& mutable_output() override { return in->mutable_output(); }
  std::vector<Parameter<float>> parameters(const std::string& prefix) override { return in->parameters(prefix); }
  void set_training(bool training) override { in->set_training(training); }
  void set_batch_offset(Index first_row) override { in->set_batch_offset(first_row); }
  bool training() const override { return in->training(); }
  void set_train_target(TrainTarget target) override { in->set_train_target(target); }
  TrainTarget train_target() const override { return in->train_target(); }
  void merge() override { in->merge(); }
  void check_merge() override { in->check_merge(); }
  void unmerge() override { in->unmerge(); }
  bool merged() const override { return in->merged(); }
  void reinit() override { in->reinit(); }
  bool replayable() const override { return in->replayable(); }
  std::uint32_t step_signature() const override { return in->step_signature(); }
  void save_state(StateDict<float>& state) const override { in->save_state(state); }
  void check_state(const StateDict<float>& state) const override { in->check_state(state); }
  void restore_state(const StateDict<float>& state) override { in->restore_state(state); }
};

// A layer of the kind under test on W, with B set (so that the adapter moves the output).
using LayerMaker = std::function<std::unique_ptr<Layer<float>>(Backend<float>&, const LoraConfig&,
                                                               const HostMatrix<float>& W, const HostMatrix<float>& B)>;

}  // namespace

TEST_CASE("a model whose layers take their ReLU trains as one whose model applies it: LoRA and DoRA") {
  // The same 3-layer model twice on one backend: in the first, Model::add gives each hidden layer
  // its ReLU; in the second each layer is wrapped in Declining, so the model's own pass applies
  // it. Loss and every gradient must agree (the same values, up to the order a cuBLASLt epilogue
  // sums in).
  const LayerMaker lora = [](Backend<float>& backend, const LoraConfig& config, const HostMatrix<float>& W,
                             const HostMatrix<float>& B) -> std::unique_ptr<Layer<float>> {
    auto layer = make_lora_linear<float>(backend, config, W, LayerChoice::reference);
    layer->set_B(B);
    return layer;
  };
  const LayerMaker dora = [](Backend<float>& backend, const LoraConfig& config, const HostMatrix<float>& W,
                             const HostMatrix<float>& B) -> std::unique_ptr<Layer<float>> {
    auto layer = std::make_unique<DoraLinear<float>>(backend, DoraConfig{.lora = config}, W);
    layer->set_B(B);
    return layer;
  };
  for (const Device device : devices_here()) {
    auto backend = make_backend<float>(device);
    for (const BasePrecision format : {BasePrecision::fp32, BasePrecision::bf16}) {
      for (const bool use_dora : {false, true}) {
        const LayerMaker& make = use_dora ? dora : lora;
        const std::vector<Index> widths{48, 160, 96, 24};
        Model<float> taking(backend), declining(backend);
        std::mt19937_64 gen(33);
        for (std::size_t i = 0; i + 1 < widths.size(); ++i) {
          const LoraConfig config{.in_features = widths[i], .out_features = widths[i + 1], .rank = 4, .alpha = 8,
                                  .bias = BiasMode::trainable, .seed = 7 + i, .base_precision = format};
          const HostMatrix<float> W = normal_matrix<float>(widths[i + 1], widths[i], gen, 0.3);
          const HostMatrix<float> B = normal_matrix<float>(widths[i + 1], 4, gen, 0.2);
          const Activation f = i + 2 < widths.size() ? Activation::relu : Activation::identity;
          taking.add(make(*backend, config, W, B), f);
          declining.add(std::make_unique<Declining>(make(*backend, config, W, B)), f);
        }
        const HostMatrix<float> x = normal_matrix<float>(64, widths.front(), gen);
        const HostMatrix<float> t = normal_matrix<float>(64, widths.back(), gen);
        const Tensor<float> X = to_backend<float>(*backend, x, "X");
        const Tensor<float> target = to_backend<float>(*backend, t, "target");
        MseLoss<float> loss_a(*backend), loss_b(*backend);
        taking.forward_with_loss(X, loss_a, target);
        declining.forward_with_loss(X, loss_b, target);
        taking.backward(loss_a.gradient());
        declining.backward(loss_b.gradient());
        const double loss_error = std::abs(loss_a.value() - loss_b.value()) / std::abs(loss_b.value());
        INFO(std::string(device_name(device)) << " " << std::string(precision_name(format)) << std::string(use_dora ? " DoRA" : " LoRA")
                                              << ": loss "
                                 << loss_a.value() << " vs " << loss_b.value());
        CHECK(loss_error <= 1e-6);
        const auto pa = taking.parameters(), pb = declining.parameters();
        REQUIRE(pa.size() == pb.size());
        for (std::size_t p = 0; p < pa.size(); ++p) {
          const HostMatrix<float> ga = to_host(*backend, *pa[p].grad), gb = to_host(*backend, *pb[p].grad);
          const double err = double((ga - gb).norm()) / std::max(double(gb.norm()), 1e-30);
          INFO(pa[p].name << ": relative difference " << err);
          CHECK(err <= 1e-5);
        }
      }
    }
  }
}

TEST_CASE("a DoRA layer that takes its ReLU gives ReLU of its twin's output: with dropout, merged or not") {
  for (const Device device : devices_here()) {
    auto backend = make_backend<float>(device);
    for (const BasePrecision format : {BasePrecision::fp32, BasePrecision::bf16}) {
      for (const double dropout : {0.0, 0.25}) {
        const LoraConfig lora{.in_features = 96, .out_features = 80, .rank = 8, .alpha = 16, .dropout = dropout,
                              .bias = BiasMode::frozen, .seed = 5, .base_precision = format};
        std::mt19937_64 gen(22);
        const HostMatrix<float> W = normal_matrix<float>(80, 96, gen, 0.3);
        const HostMatrix<float> B = normal_matrix<float>(80, 8, gen, 0.2);
        const HostMatrix<float> b = normal_matrix<float>(1, 80, gen, 0.1);
        DoraLinear<float> taken(*backend, DoraConfig{.lora = lora}, W), plain(*backend, DoraConfig{.lora = lora}, W);
        for (DoraLinear<float>* layer : {&taken, &plain}) {
          layer->set_B(B);
          layer->set_b(b);
        }
        REQUIRE(taken.take_output_activation(Activation::relu));
        CHECK_FALSE(plain.take_output_activation(Activation::tanh));
        CHECK(taken.output_activation() == Activation::relu);
        CHECK(plain.output_activation() == Activation::identity);
        const Tensor<float> X = to_backend<float>(*backend, normal_matrix<float>(131, 96, gen), "X");
        for (const bool merged : {false, true}) {
          if (merged) {
            taken.merge();
            plain.merge();
          }
          // The twins draw the same dropout masks: the same seed and the same number of draws.
          const HostMatrix<float> y = to_host(*backend, taken.forward(X));
          const HostMatrix<float> want = to_host(*backend, plain.forward(X)).cwiseMax(0.0f);
          const double worst = double((y - want).cwiseAbs().maxCoeff());
          const double scale = double(want.cwiseAbs().maxCoeff());
          INFO(std::string(device_name(device)) << " " << std::string(precision_name(format)) << " dropout " << dropout
                                   << std::string(merged ? " merged" : "") << ": worst " << worst << " of " << scale);
          CHECK(y.minCoeff() >= 0.0f);
          CHECK((y.array() > 0).count() > y.size() / 4);
          if (merged && device == Device::cuda) {
            CHECK(worst <= 1e-5 * scale);  // the merged product with cuBLASLt's ReLU epilogue
          } else {
            CHECK(worst == 0.0);
          }
        }
      }
    }
  }
}

TEST_CASE("FrozenBase forward applies only an in-place activation") {
  auto backend = make_backend<float>(Device::cpu);
  FrozenBase<float> base(*backend, 6, 5, BiasMode::none, BasePrecision::fp32, BaseMerge::nearest, 3, "base");
  Tensor<float> X = backend->allocate(2, 5), Y = backend->allocate(2, 6);
  backend->fill(X, 1.0f);
  const std::string message = relora::testing::what_of([&] { base.forward(X, 0.0f, Activation::tanh, Y); });
  CHECK(message.find("only identity or ReLU") != std::string::npos);
}
