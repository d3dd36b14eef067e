// Model's buffer reuse (in-place ReLU, in-place activation backward, dX written into dead
// outputs or scratch) against a reference chain of standalone layers with buffers of their own.
#include <doctest/doctest.h>

#include "gradient_check.hpp"
#include "relora/relora.hpp"

using namespace relora;
using relora::testing::host_of;
using relora::testing::relative_error;

namespace {

// Reference: each layer alone, every intermediate in its own tensor.
struct Chain {
  std::shared_ptr<Backend<double>> backend = make_backend<double>(Device::cpu);
  std::vector<std::unique_ptr<LoraLinear<double>>> layers;
  std::vector<Activation> activations;
  std::vector<Tensor<double>> Z, dY;
};

}  // namespace

TEST_CASE("Model's reused buffers give the same gradients as standalone layers, widths growing and shrinking") {
  // 5 -> 9 -> 4 -> 11 -> 3: dX of a widening layer does not fit its own output and takes scratch.
  const std::vector<Index> widths = {5, 9, 4, 11, 3};
  for (Activation hidden : {Activation::relu, Activation::tanh, Activation::identity}) {
    for (double dropout : {0.0, 0.25}) {
      auto backend = make_backend<double>(Device::cpu);
      Model<double> model(backend);
      Chain ref;
      for (std::size_t i = 0; i + 1 < widths.size(); ++i) {
        LoraConfig config{.in_features = widths[i], .out_features = widths[i + 1], .rank = 2, .dropout = dropout,
                          .bias = BiasMode::trainable, .seed = 40 + i};
        const Activation f = i + 2 < widths.size() ? hidden : Activation::identity;
        LoraLinear<double>& layer = model.add(config, f);
        layer.set_B(HostMatrix<double>::Random(widths[i + 1], 2));
        ref.layers.push_back(std::make_unique<LoraLinear<double>>(*ref.backend, config));
        ref.layers.back()->set_B(to_host(*backend, layer.B()));
        ref.layers.back()->set_b(to_host(*backend, layer.b()));
        ref.activations.push_back(f);
      }
      const HostMatrix<double> x = HostMatrix<double>::Random(7, widths.front());
      const HostMatrix<double> t = HostMatrix<double>::Random(7, widths.back());
      Tensor<double> X = to_backend<double>(*backend, x, "X"), target = to_backend<double>(*backend, t, "target");
      Tensor<double> rX = to_backend<double>(*ref.backend, x, "X"), rt = to_backend<double>(*ref.backend, t, "target");
      MseLoss<double> loss(*backend), ref_loss(*ref.backend);

      for (int step = 0; step < 2; ++step) {  // the second step runs on the buffers the first sized
        model.backward(loss.forward_backward(model.forward(X), target));

        const Tensor<double>* input = &rX;
        ref.Z.clear();
        ref.Z.reserve(ref.layers.size());  // each layer keeps a pointer to its input
        ref.dY.clear();
        for (std::size_t i = 0; i < ref.layers.size(); ++i) {
          const Tensor<double>& Y = ref.layers[i]->forward(*input);
          ref.Z.push_back(ref.backend->allocate(Y.rows(), Y.cols()));
          ref.backend->activation_forward(ref.activations[i], Y, ref.Z.back());
          input = &ref.Z.back();
        }
        const Tensor<double>* grad = &ref_loss.forward_backward(*input, rt);
        CHECK(ref_loss.value() == doctest::Approx(loss.value()).epsilon(1e-12));
        for (std::size_t i = ref.layers.size(); i-- > 0;) {
          const Tensor<double>& Y = ref.layers[i]->output();
          ref.dY.push_back(ref.backend->allocate(Y.rows(), Y.cols()));
          ref.backend->activation_backward(ref.activations[i], Y, *grad, ref.dY.back());
          ref.layers[i]->backward(ref.dY.back(), i > 0);
          grad = &ref.layers[i]->dX();
        }
        auto params = model.parameters();
        std::vector<Parameter<double>> ref_params;
        for (std::size_t i = 0; i < ref.layers.size(); ++i) {
          for (auto& p : ref.layers[i]->parameters("l")) ref_params.push_back(p);
        }
        REQUIRE(params.size() == ref_params.size());
        for (std::size_t i = 0; i < params.size(); ++i) {
          const double err = relative_error(host_of(*params[i].grad), host_of(*ref_params[i].grad));
          INFO(params[i].name << " step " << step << " relative error " << err);
          CHECK(err < 1e-12);
        }
        // The last dX computed (layer 1's) is exact after backward when layer 0's activation does
        // not overwrite it in place; the others' buffers have been reused.
        if (hidden == Activation::identity) {
          CHECK(relative_error(host_of(model.lora(1).dX()), host_of(ref.layers[1]->dX())) < 1e-12);
        }
        CHECK(model.lora(0).dX().empty());
      }
      CHECK_THROWS_WITH_AS(model.backward(loss.forward_backward(model.lora(3).output(), target)),
                           doctest::Contains("no forward since the last backward"), ConfigError);
    }
  }
}
