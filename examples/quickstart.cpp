// Fits y = x W_true^T with a rank-2 adapter on a frozen W0, then with ReLoRA restarts.
#include <relora/relora.hpp>

#include <iostream>

int main() {
  using namespace relora;
  auto backend = make_backend<float>(Device::cpu);  // or Device::cuda
  const HostMatrix<float> X = HostMatrix<float>::Random(256, 16);
  const HostMatrix<float> W_true = HostMatrix<float>::Random(8, 16);
  const HostMatrix<float> Y = X * W_true.transpose();

  Model<float> model(backend);
  model.add(LoraConfig{.in_features = 16, .out_features = 8, .rank = 2, .alpha = 2}, Activation::identity,
            HostMatrix<float>::Zero(8, 16), "proj");

  TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-2}, .relora = {.restart_every = 100}};
  Trainer<float> trainer(model, config);
  Tensor<float> x = to_backend<float>(*backend, X, "X");
  Tensor<float> y = to_backend<float>(*backend, Y, "Y");
  for (int step = 0; step < 1000; ++step) trainer.step(x, y);
  std::cout << "loss after 1000 steps: " << trainer.loss() << " ("
            << trainer.controller()->restarts_done() << " restarts)\n";
  return trainer.loss() < 1e-3 ? 0 : 1;
}
