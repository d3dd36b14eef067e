// The CUDA backend's adapter passes (cuda_adapter_passes.cu): layers too wide for the one-kernel
// path but of rank at most 32 run their rank-sized work as row, column and reduce kernels. Checked
// against the CPU's separate products on every output (odd widths, a partial warp of rows, chunks
// of rows that do not divide n, every rank bucket), against central finite differences in double,
// for the range of shapes that takes them, and over training: graph replays give the eager
// losses bit for bit (the column sums are added in a fixed order), and the CPU's within rounding.
#include <doctest/doctest.h>

#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "gradient_check.hpp"
#include "lora_layer_run.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::cuda_or_skip;
using relora::testing::normal_matrix;
using relora::testing::numeric_gradient_on;
using relora::testing::implementation_for;

namespace {

using Shape = relora::testing::LayerShape;

// Shapes that take the adapter passes: ranks in each of the 8, 16 and 32 buckets; n odd, below a
// block's 8 rows, and past one chunk of the column pass; widths not multiples of a warp; d = 1;
// tiny widths with too many rows for the one-block backward (forward fused, backward passes).
const std::vector<Shape>& adapter_shapes() {
  static const std::vector<Shape> shapes = {
      {300, 200, 130, 16}, {77, 40, 300, 3}, {130, 64, 33, 32}, {1030, 48, 40, 9}, {5, 33, 1, 1}, {5000, 8, 8, 4},
  };
  return shapes;
}

// Losses of 40 ReLoRA steps (20 under the sanitizer) of a two-layer model whose layers both take
// the adapter passes.
// `replayed`, where given, receives how many steps were graph replays.
std::vector<double> train_wide(Device device, bool use_graphs, bool fused, std::int64_t* replayed = nullptr) {
  auto backend = make_backend<float>(device);
  std::mt19937 gen(21);
  const HostMatrix<float> X = normal_matrix<float>(300, 64, gen), target = normal_matrix<float>(300, 40, gen);
  Model<float> model(backend, fused ? LayerChoice::fastest : LayerChoice::reference);
  model.add(LoraConfig{.in_features = 64, .out_features = 96, .rank = 8, .alpha = 16, .bias = BiasMode::trainable,
                       .seed = 2},
            Activation::relu, normal_matrix<float>(96, 64, gen, 0.2));
  model.add(LoraConfig{.in_features = 96, .out_features = 40, .rank = 8, .alpha = 16, .seed = 3},
            Activation::identity, normal_matrix<float>(40, 96, gen, 0.2));
  TrainerConfig config;
  config.method = TrainingMethod::relora;
  config.relora.restart_every = 15;
  config.adam.lr = 3e-3;
  config.use_graphs = use_graphs;
  Trainer<float> trainer(model, config);
  Tensor<float> x = to_backend<float>(*backend, X, "X"), t = to_backend<float>(*backend, target, "target");
  std::vector<double> losses;
  const int steps = relora::testing::under_sanitizer() ? 20 : 40;
  for (int step = 0; step < steps; ++step) {
    trainer.step(x, t);
    losses.push_back(trainer.loss());
  }
  if (replayed) *replayed = trainer.replayed_steps();
  return losses;
}

}  // namespace

TEST_CASE("cuda adapter passes: same outputs and gradients as the CPU's separate products") {
  if (!cuda_or_skip("cuda adapter passes")) return;
  relora::testing::compare_with_separate_products<float>(Device::cuda, adapter_shapes(), 1e-5);
  relora::testing::compare_with_separate_products<double>(Device::cuda, adapter_shapes(), 1e-12);
}

TEST_CASE("cuda adapter passes: taken for wide layers of rank up to 32, within the work limit, unless switched off") {
  if (!cuda_or_skip("cuda adapter passes")) return;
  auto gpu = make_backend<float>(Device::cuda);
  CHECK(implementation_for(*gpu, {1024, 1024, 1024, 16}) == "cuda_adapter");  // layer1k
  CHECK(implementation_for(*gpu, {300, 200, 130, 32}) == "cuda_adapter");
  CHECK(implementation_for(*gpu, {300, 200, 130, 33}) == "reference");     // rank over the limit
  CHECK(implementation_for(*gpu, {4096, 4096, 4096, 16}) == "reference");  // large enough for cuBLAS's tiles
  const LoraConfig layer1k{.in_features = 1024, .out_features = 1024, .rank = 16};
  CHECK(std::string(make_lora_linear<float>(*gpu, layer1k, LayerChoice::reference)->implementation()) == "reference");
}

TEST_CASE("cuda adapter passes: gradients match finite differences in double") {
  if (!cuda_or_skip("cuda adapter passes")) return;
  auto backend = make_backend<double>(Device::cuda);
  const Shape s{37, 40, 33, 5};
  std::mt19937 gen(5);
  LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = s.r, .alpha = 3.0, .bias = BiasMode::trainable};
  const auto made = make_lora_linear<double>(*backend, config, normal_matrix(s.d, s.k, gen));
  LoraLinear<double>& layer = *made;
  REQUIRE(std::string(layer.implementation()) == "cuda_adapter");
  layer.set_B(normal_matrix(s.d, s.r, gen));
  layer.set_b(normal_matrix(1, s.d, gen));
  Tensor<double> X = to_backend<double>(*backend, normal_matrix(s.n, s.k, gen), "X");
  const HostMatrix<double> G = normal_matrix(s.n, s.d, gen);
  auto loss = [&]() { return to_host(*backend, layer.forward(X)).cwiseProduct(G).sum(); };
  loss();
  Tensor<double> dY = to_backend<double>(*backend, G, "dY");
  layer.backward(dY, /*need_dX=*/true);
  const HostMatrix<double> dA = to_host(*backend, layer.dA()), dB = to_host(*backend, layer.dB()),
                           db = to_host(*backend, layer.db()), dX = to_host(*backend, layer.dX());
  using relora::testing::relative_error;
  auto numeric = [&](const Tensor<double>& t, const HostMatrix<double>& analytic) {
    return numeric_gradient_on(*backend, const_cast<Tensor<double>&>(t), loss, 1e-6, &analytic);
  };
  CHECK(relative_error(dA, numeric(layer.A(), dA)) < 1e-7);
  CHECK(relative_error(dB, numeric(layer.B(), dB)) < 1e-7);
  CHECK(relative_error(db, numeric(layer.b(), db)) < 1e-7);
  CHECK(relative_error(dX, numeric(X, dX)) < 1e-7);
}

TEST_CASE("cuda adapter passes: graph replays give the eager losses bit for bit, and the CPU's within rounding") {
  if (!cuda_or_skip("cuda adapter passes")) return;
  std::int64_t replayed = 0;
  const std::vector<double> graph = train_wide(Device::cuda, true, true, &replayed);
  // The passes' workspace is sized in the first (eager) step; a replay is refused after any
  // allocation, so replays here show that steady steps allocate nothing, and make the bit-for-bit
  // comparison one of replays, not of eager steps twice.
  CHECK(replayed > (relora::testing::under_sanitizer() ? 10 : 30));
  const std::vector<double> eager = train_wide(Device::cuda, false, true);
  const std::vector<double> separate = train_wide(Device::cuda, true, false);
  const std::vector<double> cpu = train_wide(Device::cpu, false, false);
  REQUIRE(graph.size() == cpu.size());
  for (std::size_t i = 0; i < graph.size(); ++i) {
    CAPTURE(i);
    CHECK(graph[i] == eager[i]);
    CHECK(graph[i] == doctest::Approx(separate[i]).epsilon(1e-4));
    CHECK(graph[i] == doctest::Approx(cpu[i]).epsilon(1e-4));
  }
  CHECK(graph.back() < 0.9 * graph.front());  // it trains
}
