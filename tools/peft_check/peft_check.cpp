// The C++ half of the PEFT check (scripts/peft_roundtrip.py drives it). The model is PyTorch's
//   nn.Sequential(Linear(16, 32), ReLU(), Linear(32, 32), ReLU(), Linear(32, 8))
// with modules "0", "2", "4": rank 4 and alpha 8 on "0" and "2", rank 2 and alpha 4 on "4" (PEFT's
// rank_pattern / alpha_pattern), use_rslora from the command line, and DoRA (DoraLinear layers,
// PEFT's use_dora) when the optional last argument is 1.
//
//   relora_peft_check export BASE X ADAPTER_DIR OUT RSLORA [DORA]   train adapters, export them, outputs on X
//   relora_peft_check import BASE X ADAPTER_DIR OUT RSLORA [DORA]   import a PEFT adapter, outputs on X
//
// BASE: the base model's state_dict (safetensors), X: a safetensors file with "x" (n x 16),
// OUT: a safetensors file with "y" (n x 8), the model's outputs in eval mode (no dropout).
#include <cstdio>
#include <cstring>
#include <iostream>
#include <random>
#include <string>

#include "relora/relora.hpp"
#include "relora/io/safetensors.hpp"
#include "relora/layers/dora_linear.hpp"

using namespace relora;

namespace {

std::unique_ptr<Model<float>> mlp(bool rslora, bool dora) {
  auto backend = make_backend<float>(Device::cpu);
  auto model = std::make_unique<Model<float>>(backend);
  const auto cfg = [&](Index k, Index d, Index r, double alpha, std::uint64_t seed) {
    return LoraConfig{.in_features = k, .out_features = d, .rank = r, .alpha = alpha, .rslora = rslora,
                      .dropout = 0.1, .bias = BiasMode::frozen, .seed = seed};
  };
  const auto add = [&](const LoraConfig& c, Activation activation, const std::string& name) {
    if (dora) {
      model->add(std::make_unique<DoraLinear<float>>(*backend, DoraConfig{.lora = c}), activation, name);
    } else {
      model->add(c, activation, name);
    }
  };
  add(cfg(16, 32, 4, 8, 1), Activation::relu, "0");
  add(cfg(32, 32, 4, 8, 2), Activation::relu, "2");
  add(cfg(32, 8, 2, 4, 3), Activation::identity, "4");
  return model;
}

HostMatrix<float> read_x(const std::string& path) {
  const SafetensorsFile file = SafetensorsFile::read(path);
  const std::vector<std::int64_t> shape = file.shape("x");
  if (shape.size() != 2 || shape[1] != 16) throw ShapeError(path + ": x must be n x 16, is " + shape_text(shape));
  const std::vector<float> values = file.to_float("x");
  return Eigen::Map<const HostMatrix<float>>(values.data(), shape[0], shape[1]);
}

void write_y(const std::string& path, const HostMatrix<float>& y) {
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  writer.add("y", {y.rows(), y.cols()}, y.data());
  writer.write_atomically(path);
}

// A few adapter steps towards a random target, so that every B (and DoRA's m) moves.
void train(Model<float>& model) {
  std::mt19937_64 gen(42);
  std::normal_distribution<float> normal;
  HostMatrix<float> X(64, 16), Y(64, 8);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = normal(gen);
  for (Index i = 0; i < Y.size(); ++i) Y.data()[i] = normal(gen);
  Trainer<float> trainer(model, TrainerConfig{.method = TrainingMethod::lora, .adam = {.lr = 1e-2}});
  Tensor<float> x = to_backend<float>(model.backend(), X, "X"), y = to_backend<float>(model.backend(), Y, "Y");
  for (int step = 0; step < 20; ++step) trainer.step(x, y);
  std::cout << "relora: 20 adapter steps, loss " << trainer.loss() << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if ((argc != 7 && argc != 8) || (std::strcmp(argv[1], "export") != 0 && std::strcmp(argv[1], "import") != 0)) {
    std::cerr << "usage: relora_peft_check export|import BASE X ADAPTER_DIR OUT RSLORA(0|1) [DORA(0|1)]\n";
    return 2;
  }
  const std::string mode = argv[1], base = argv[2], x_path = argv[3], adapter = argv[4], out = argv[5];
  const bool rslora = std::strcmp(argv[6], "1") == 0;
  const bool dora = argc == 8 && std::strcmp(argv[7], "1") == 0;
  try {
    auto model = mlp(rslora, dora);
    load_base_weights(*model, base);
    if (mode == "export") {
      train(*model);
      for (std::size_t i = 0; i < model->size(); ++i) {
        if (const auto* d = dynamic_cast<const DoraLinear<float>*>(&model->layer(i))) {
          // m against the row norms it started from (those of W, as B was 0): how far m trained.
          const HostMatrix<float> W = to_host(model->backend(), d->W());
          const HostMatrix<float> m = to_host(model->backend(), d->m());
          std::cout << "relora: module " << model->name(i) << " max |B| "
                    << to_host(model->backend(), d->B()).cwiseAbs().maxCoeff() << ", max |m - ||W_i|||| "
                    << (m.transpose() - W.rowwise().norm()).cwiseAbs().maxCoeff() << "\n";
          continue;
        }
        std::cout << "relora: module " << model->name(i) << " max |B| "
                  << to_host(model->backend(), model->lora(i).B()).cwiseAbs().maxCoeff() << "\n";
      }
      export_peft_adapter(*model, adapter, {.base_model_name_or_path = "peft_roundtrip_mlp"});
    } else {
      const PeftImportResult result = import_peft_adapter(*model, adapter);
      std::cout << "relora: imported " << result.loaded.size() << " modules, " << result.zeroed.size()
                << " untargeted\n";
    }
    model->set_training(false);
    write_y(out, model->predict(read_x(x_path)));
  } catch (const std::exception& e) {
    std::cerr << "relora_peft_check: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
