// The layers, model, optimizer and ReLoRA controller on CUDA against the CPU, through the public
// API alone: same inputs, same counter-based random draws, so every tensor must agree to float
// rounding. Skipped, with the reason, where no GPU is visible.
#include <doctest/doctest.h>

#include <random>

#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::cuda_or_skip;
using relora::testing::normal_matrix;

namespace {

double relative_error(const HostMatrix<float>& a, const HostMatrix<float>& b) {
  return double((a - b).norm()) / std::max(double(b.norm()), 1e-30);
}

// The same 3-layer model on a backend, from the same host weights and seeds.
struct Twin {
  std::shared_ptr<Backend<float>> backend;
  Model<float> model;
  explicit Twin(Device device, double dropout) : backend(make_backend<float>(device)), model(backend) {
    std::mt19937_64 gen(17);
    const Index widths[] = {96, 80, 64, 24};
    const Activation acts[] = {Activation::gelu, Activation::relu, Activation::identity};
    for (int i = 0; i < 3; ++i) {
      LoraConfig config{.in_features = widths[i], .out_features = widths[i + 1], .rank = 8, .alpha = 16,
                        .dropout = dropout, .bias = BiasMode::trainable, .seed = std::uint64_t(100 + i)};
      auto& layer = model.add(config, acts[i], normal_matrix<float>(widths[i + 1], widths[i], gen, 0.1));
      layer.set_B(normal_matrix<float>(widths[i + 1], 8, gen, 0.05));
      layer.set_b(normal_matrix<float>(1, widths[i + 1], gen, 0.1));
    }
  }
};

void expect_close(const HostMatrix<float>& cuda, const HostMatrix<float>& cpu, const std::string& what,
                  double tolerance = 1e-5) {
  const double err = relative_error(cuda, cpu);
  MESSAGE(what << ": CUDA vs CPU relative error " << err);
  CHECK(err <= tolerance);
}

}  // namespace

TEST_CASE("cuda parity: forward and every gradient of a 3-layer model, with dropout") {
  if (!cuda_or_skip("CUDA parity test")) return;
  Twin cpu(Device::cpu, 0.1), gpu(Device::cuda, 0.1);
  std::mt19937_64 gen(5);
  const HostMatrix<float> x = normal_matrix<float>(50, 96, gen), y = normal_matrix<float>(50, 24, gen);
  MseLoss<float> cpu_loss(*cpu.backend), gpu_loss(*gpu.backend);
  Tensor<float> cx = to_backend<float>(*cpu.backend, x, "X"), gx = to_backend<float>(*gpu.backend, x, "X");
  Tensor<float> cy = to_backend<float>(*cpu.backend, y, "Y"), gy = to_backend<float>(*gpu.backend, y, "Y");
  expect_close(to_host(*gpu.backend, gpu.model.forward(gx)), to_host(*cpu.backend, cpu.model.forward(cx)), "output");
  cpu.model.backward(cpu_loss.forward_backward(cpu.model.forward(cx), cy));
  gpu.model.backward(gpu_loss.forward_backward(gpu.model.forward(gx), gy));
  CHECK(gpu_loss.value() == doctest::Approx(cpu_loss.value()).epsilon(1e-5));
  auto cpu_params = cpu.model.parameters(), gpu_params = gpu.model.parameters();
  for (std::size_t i = 0; i < cpu_params.size(); ++i) {
    expect_close(to_host(*gpu.backend, *gpu_params[i].grad), to_host(*cpu.backend, *cpu_params[i].grad),
                 "d" + cpu_params[i].name);
  }
  for (std::size_t i = 1; i < cpu.model.size(); ++i) {
    expect_close(to_host(*gpu.backend, gpu.model.lora(i).dX()), to_host(*cpu.backend, cpu.model.lora(i).dX()),
                 "dX of " + cpu.model.name(i));
  }
}

// Each operation from the same state on both backends: training for several steps first would
// compare Adam's sign-like first updates of near-zero gradients, which rounding may flip.
void copy_state(Twin& from, Trainer<float>& from_trainer, Twin& to, Trainer<float>& to_trainer) {
  for (std::size_t i = 0; i < from.model.size(); ++i) {
    LoraLinear<float>& src = from.model.lora(i);
    LoraLinear<float>& dst = to.model.lora(i);
    dst.set_W(to_host(*from.backend, src.W()));
    dst.set_A(to_host(*from.backend, src.A()));
    dst.set_B(to_host(*from.backend, src.B()));
    dst.set_rng_stream(src.rng_stream());
  }
  StateDict<float> optimizer_state;
  from_trainer.optimizer().save_state(optimizer_state);
  to_trainer.optimizer().restore_state(optimizer_state);
}

TEST_CASE("cuda parity: an Adam step, a ReLoRA restart with pruning, merge and unmerge") {
  if (!cuda_or_skip("CUDA parity test")) return;
  Twin cpu(Device::cpu, 0.0), gpu(Device::cuda, 0.0);
  std::mt19937_64 gen(6);
  const HostMatrix<float> x = normal_matrix<float>(64, 96, gen), y = normal_matrix<float>(64, 24, gen);
  TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-3, .weight_decay = 0.01},
                       .lora_plus_ratio = 4, .relora = {.restart_every = 5, .reset = OptimizerReset::magnitude_prune,
                                                        .prune_fraction = 0.5}};
  Trainer<float> cpu_trainer(cpu.model, config), gpu_trainer(gpu.model, config);
  Tensor<float> cx = to_backend<float>(*cpu.backend, x, "X"), gx = to_backend<float>(*gpu.backend, x, "X");
  Tensor<float> cy = to_backend<float>(*cpu.backend, y, "Y"), gy = to_backend<float>(*gpu.backend, y, "Y");
  cpu_trainer.step(cx, cy);
  gpu_trainer.step(gx, gy);
  for (std::size_t i = 0; i < cpu.model.size(); ++i) {
    expect_close(to_host(*gpu.backend, gpu.model.lora(i).A()), to_host(*cpu.backend, cpu.model.lora(i).A()),
                 "A after one Adam step, layer " + std::to_string(i));
    expect_close(to_host(*gpu.backend, gpu.model.lora(i).B()), to_host(*cpu.backend, cpu.model.lora(i).B()),
                 "B after one Adam step, layer " + std::to_string(i));
  }
  for (int step = 1; step < 4; ++step) cpu_trainer.step(cx, cy);
  copy_state(cpu, cpu_trainer, gpu, gpu_trainer);
  cpu_trainer.controller()->restart(cpu.model, cpu_trainer.optimizer(), nullptr, 4);
  gpu_trainer.controller()->restart(gpu.model, gpu_trainer.optimizer(), nullptr, 4);
  for (std::size_t i = 0; i < cpu.model.size(); ++i) {
    const std::string layer = ", layer " + std::to_string(i);
    expect_close(to_host(*gpu.backend, gpu.model.lora(i).W()), to_host(*cpu.backend, cpu.model.lora(i).W()),
                 "W after a restart" + layer);
    expect_close(to_host(*gpu.backend, gpu.model.lora(i).A()), to_host(*cpu.backend, cpu.model.lora(i).A()),
                 "A re-drawn at the restart" + layer);
    CHECK(to_host(*gpu.backend, gpu.model.lora(i).B()).norm() == 0);
  }
  for (std::size_t i = 0; i < cpu_trainer.optimizer().size(); ++i) {
    const HostMatrix<float> gm = to_host(*gpu.backend, dynamic_cast<Adam<float>&>(gpu_trainer.optimizer()).m(i));
    const HostMatrix<float> cm = to_host(*cpu.backend, dynamic_cast<Adam<float>&>(cpu_trainer.optimizer()).m(i));
    CHECK(((gm.array() == 0) == (cm.array() == 0)).all());  // the same entries pruned
    expect_close(gm, cm, "m after pruning, " + cpu_trainer.optimizer().parameter(i).name);
  }
  copy_state(cpu, cpu_trainer, gpu, gpu_trainer);
  for (std::size_t i = 0; i < cpu.model.size(); ++i) {
    cpu.model.lora(i).set_B(normal_matrix<float>(cpu.model.lora(i).out_features(), 8, gen, 0.05));
    gpu.model.lora(i).set_B(to_host(*cpu.backend, cpu.model.lora(i).B()));
  }
  cpu.model.merge();
  gpu.model.merge();
  expect_close(to_host(*gpu.backend, gpu.model.lora(1).W()), to_host(*cpu.backend, cpu.model.lora(1).W()), "merged W");
  cpu.model.unmerge();
  gpu.model.unmerge();
  expect_close(to_host(*gpu.backend, gpu.model.lora(1).W()), to_host(*cpu.backend, cpu.model.lora(1).W()),
               "unmerged W");
}

TEST_CASE("cuda parity: the 300-step seed regression, every method, final losses within 1e-3") {
  if (!cuda_or_skip("CUDA parity test")) return;
  std::mt19937_64 gen(0);
  const HostMatrix<float> x = normal_matrix<float>(200, 10, gen), W_true = normal_matrix<float>(5, 10, gen);
  const HostMatrix<float> y = x * W_true.transpose() + normal_matrix<float>(200, 5, gen, 0.1);
  const HostMatrix<float> W0 = normal_matrix<float>(5, 10, gen, 0.1);
  auto final_loss = [&](Device device, TrainingMethod method) {
    auto backend = make_backend<float>(device);
    Model<float> model(backend);
    model.add(LoraConfig{.in_features = 10, .out_features = 5, .rank = 4, .alpha = 4}, Activation::identity, W0);
    Trainer<float> trainer(model, TrainerConfig{.method = method, .adam = {.lr = 1e-2}, .relora = {.restart_every = 50}});
    Tensor<float> X = to_backend<float>(*backend, x, "X"), Y = to_backend<float>(*backend, y, "Y");
    // 30 steps under the sanitizer: the same kernels, a tenth of the launches.
    const int steps = relora::testing::under_sanitizer() ? 30 : 300;
    for (int i = 0; i < steps; ++i) trainer.step(X, Y);
    return double(trainer.loss());
  };
  for (TrainingMethod method : {TrainingMethod::full_finetune, TrainingMethod::lora, TrainingMethod::relora}) {
    const double cpu = final_loss(Device::cpu, method), gpu = final_loss(Device::cuda, method);
    MESSAGE("method " << int(method) << ": final loss CPU " << cpu << ", CUDA " << gpu << ", relative difference "
                      << std::abs(gpu - cpu) / cpu);
    CHECK(std::abs(gpu - cpu) <= 1e-3 * cpu);
  }
}
