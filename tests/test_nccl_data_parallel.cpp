// Data-parallel training through NCCL on the GPU: a group of one rank (every GPU the machine has
// would be one rank each in a larger test; this one needs a single GPU) trains as a trainer
// without a communicator does, to the bit, with its gradient all-reduces recorded into the
// step's CUDA graph and replayed.
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "relora/distributed/nccl_communicator.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::normal_matrix;

namespace {

struct RunResult {
  std::vector<float> losses;
  HostMatrix<float> B_last, A_first;
  std::int64_t replayed = 0;
};

RunResult train(bool through_nccl) {
  auto backend = make_backend<float>(Device::cuda);
  Model<float> model(backend);
  model.add(LoraConfig{.in_features = 64, .out_features = 96, .rank = 8, .bias = BiasMode::trainable, .seed = 3},
            Activation::relu);
  model.add(LoraConfig{.in_features = 96, .out_features = 32, .rank = 8, .seed = 4}, Activation::identity);
  std::shared_ptr<Communicator<float>> comm;
  if (through_nccl) {
    auto comms = make_nccl_communicators<float>({backend});
    comm = std::shared_ptr<Communicator<float>>(std::move(comms.at(0)));
  }
  const TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 2e-3}, .lora_plus_ratio = 4,
                             .relora = {.restart_every = 6, .restart_warmup_steps = 2}};
  Trainer<float> trainer(model, config, nullptr, nullptr, comm);
  std::mt19937_64 gen(7);
  const Tensor<float> X = to_backend<float>(*backend, normal_matrix<float>(128, 64, gen), "X");
  const Tensor<float> Y = to_backend<float>(*backend, normal_matrix<float>(128, 32, gen), "Y");
  RunResult out;
  for (int step = 0; step < 20; ++step) {
    trainer.step(X, Y);
    out.losses.push_back(trainer.loss());
  }
  out.B_last = to_host(*backend, model.lora(1).B());
  out.A_first = to_host(*backend, model.lora(0).A());
  out.replayed = trainer.replayed_steps();
  return out;
}

}  // namespace

TEST_CASE("nccl data parallel: one rank trains as a trainer with no communicator, all-reduces in the recorded step") {
  std::string why;
  if (!nccl_available(&why)) {
    MESSAGE("skipped: " << why);
    return;
  }
  const RunResult alone = train(false);
  const RunResult ranked = train(true);
  MESSAGE("losses " << alone.losses.front() << " -> " << alone.losses.back() << "; replayed steps: alone "
                    << alone.replayed << ", one NCCL rank " << ranked.replayed);
  // A sum over one rank with scale 1 is the identity: the same bits.
  CHECK(ranked.losses == alone.losses);
  CHECK(ranked.B_last == alone.B_last);
  CHECK(ranked.A_first == alone.A_first);
  CHECK(ranked.replayed > 0);
  CHECK(ranked.losses.back() < ranked.losses.front());
}
