// Data-parallel training on thread-backed CPU ranks (ThreadCommunicator): N ranks, each on its rows
// of every batch, train as one rank on the whole batch (ReLoRA with a warm start and restarts,
// LoRA with LoRA+, DoRA, a bf16 base), to rounding; the ranks stay identical to the bit; a
// failing rank makes every rank fail and none hangs; the gradient buckets are summed layer by
// layer as the backward goes; checkpoints are written by rank 0 and resume bit for bit;
// broadcast_parameters makes the ranks' models equal.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <numeric>
#include <random>

#include "relora/distributed/broadcast_parameters.hpp"
#include "relora/distributed/distributed_checkpoint.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::normal_matrix;

namespace {

// What a run trains: the method and the model's kind. Three layers, 6 -> 8 -> 7 -> 3, batches of
// 24 rows, a fresh batch every step.
struct Setup {
  TrainingMethod method = TrainingMethod::relora;
  double lora_plus_ratio = 1;
  bool dora = false;
  BasePrecision base = BasePrecision::fp32;
  BasePrecision activations = BasePrecision::fp32;  // between layers (the middle layer's tanh is then ReLU)
  double dropout = 0;  // on every layer's adapter branch
  bool galore = false;  // GaLore (rank 2, a new subspace every 3 steps) instead of Adam
  int steps = 19;  // ReLoRA: 3 warm-start steps, then restarts after steps 7, 11, 15 and 19
};

constexpr Index kRows = 24, kIn = 6, kOut = 3;

template <typename T>
void build(Model<T>& model, const Setup& s) {
  struct Shape {
    Index k, d;
    Activation f;
    BiasMode bias;
  };
  const Shape shapes[] = {{kIn, 8, Activation::relu, BiasMode::trainable},
                          {8, 7, s.activations == BasePrecision::fp32 ? Activation::tanh : Activation::relu,
                           BiasMode::frozen},
                          {7, kOut, Activation::identity, BiasMode::none}};
  std::uint64_t seed = 11;
  for (const Shape& shape : shapes) {
    const LoraConfig config{.in_features = shape.k, .out_features = shape.d, .rank = 2, .alpha = 4,
                            .dropout = s.dropout, .bias = shape.bias,
                            .seed = seed++, .base_precision = s.base, .base_merge = BaseMerge::fp32_master};
    if (s.dora) {
      const DoraGradient gradient = seed % 2 == 0 ? DoraGradient::exact : DoraGradient::detached;
      model.add(std::make_unique<DoraLinear<T>>(model.backend(), DoraConfig{.lora = config, .gradient = gradient}),
                shape.f);
    } else {
      model.add(config, shape.f);
    }
  }
  model.set_activation_format(s.activations);
}

TrainerConfig trainer_config(const Setup& s) {
  TrainerConfig config{.method = s.method,
                       .adam = {.lr = 1e-2, .weight_decay = 0.01},
                       .lora_plus_ratio = s.lora_plus_ratio,
                       .relora = {.restart_every = 4, .reset = OptimizerReset::random_prune, .prune_fraction = 0.5,
                                  .restart_warmup_steps = 1, .warm_start_steps = 3, .seed = 5}};
  if (s.galore) {
    config.optimizer = optimizer_factory<Galore>(GaloreConfig{.lr = 1e-2, .weight_decay = 0.01, .rank = 2,
                                                              .update_gap = 3, .moments = MomentsAtRefresh::reproject});
  }
  return config;
}

template <typename T>
struct Batch {
  HostMatrix<T> X, Y;
};

template <typename T>
std::vector<Batch<T>> make_batches(int steps, std::uint64_t seed = 7) {
  std::mt19937_64 gen(seed);
  const HostMatrix<double> M = normal_matrix<double>(kIn, kOut, gen);
  std::vector<Batch<T>> batches;
  for (int i = 0; i < steps; ++i) {
    const HostMatrix<double> X = normal_matrix<double>(kRows, kIn, gen);
    const HostMatrix<double> Y = (X * M).array().tanh().matrix() + normal_matrix<double>(kRows, kOut, gen, 0.1);
    batches.push_back({X.cast<T>(), Y.cast<T>()});
  }
  return batches;
}

// What a run leaves: every tensor of the layers' and the optimizer's saved state, by name (a
// 16-bit tensor's bits as numbers), and the loss trainer.loss() reported after each step.
template <typename T>
struct Run {
  std::vector<std::string> names;
  std::vector<HostMatrix<T>> tensors;
  std::vector<T> losses;
};

template <typename T>
void keep_state(Run<T>& run, Trainer<T>& trainer) {
  run.names.clear();
  run.tensors.clear();
  const auto keep = [&](const std::string& prefix, const StateDict<T>& state) {
    for (const auto& entry : state.tensors()) {
      run.names.push_back(prefix + entry.first);
      run.tensors.push_back(entry.second);
    }
    for (const auto& entry : state.half_tensors()) {
      HostMatrix<T> bits(entry.second.rows, entry.second.cols);
      for (Index i = 0; i < bits.size(); ++i) bits.data()[i] = T(entry.second.bits[std::size_t(i)]);
      run.names.push_back(prefix + entry.first);
      run.tensors.push_back(bits);
    }
  };
  Model<T>& model = trainer.model();
  for (std::size_t i = 0; i < model.size(); ++i) {
    StateDict<T> state;
    model.layer(i).save_state(state);
    keep(model.name(i) + ".", state);
  }
  StateDict<T> optimizer;
  trainer.optimizer().save_state(optimizer);
  keep("optim.", optimizer);
}

// Rows [begin, begin + rows) of `m`, on the backend.
template <typename T>
Tensor<T> shard(Backend<T>& backend, const HostMatrix<T>& m, Index begin, Index rows) {
  return to_backend<T>(backend, m.middleRows(begin, rows), "shard");
}

// One rank's run on rows [begin, begin + rows) of every batch; no communicator: one process.
template <typename T>
Run<T> train(const Setup& s, const std::vector<Batch<T>>& batches, std::shared_ptr<Communicator<T>> comm,
             Index begin = 0, Index rows = kRows) {
  auto backend = make_backend<T>(Device::cpu);
  Model<T> model(backend);
  build(model, s);
  const TrainerConfig config = trainer_config(s);
  std::shared_ptr<Schedule> schedule;
  if (s.method == TrainingMethod::relora) {
    schedule = std::make_shared<JaggedCosineSchedule>(jagged_schedule(config.relora, s.steps, 2, 0.1));
  }
  Trainer<T> trainer(model, config, schedule, nullptr, std::move(comm));
  Run<T> run;
  for (int step = 0; step < s.steps; ++step) {
    const Batch<T>& batch = batches[std::size_t(step)];
    Tensor<T> X = shard(*backend, batch.X, begin, rows), Y = shard(*backend, batch.Y, begin, rows);
    trainer.step(X, Y);
    run.losses.push_back(trainer.loss());
  }
  keep_state(run, trainer);
  return run;
}

// Every rank's run, rank r on shards[r] rows of each batch (after the rows of the ranks before it).
template <typename T>
std::vector<Run<T>> train_ranks(const Setup& s, const std::vector<Batch<T>>& batches, const std::vector<Index>& shards) {
  REQUIRE(std::accumulate(shards.begin(), shards.end(), Index(0)) == kRows);
  std::vector<Run<T>> runs(shards.size());
  run_ranks<T>(int(shards.size()), [&](const std::shared_ptr<Communicator<T>>& comm) {
    const std::size_t r = std::size_t(comm->rank());
    const Index begin = std::accumulate(shards.begin(), shards.begin() + std::ptrdiff_t(r), Index(0));
    runs[r] = train(s, batches, comm, begin, shards[r]);
  });
  return runs;
}

// The largest difference between two runs' tensors, relative to the larger magnitude in each
// tensor, and the tensor where it is.
template <typename T>
double max_relative_difference(const Run<T>& a, const Run<T>& b, std::string& where) {
  REQUIRE(a.names == b.names);
  double worst = 0;
  for (std::size_t i = 0; i < a.tensors.size(); ++i) {
    const double scale = std::max<double>(b.tensors[i].cwiseAbs().maxCoeff(), std::numeric_limits<double>::min());
    const double difference = double((a.tensors[i] - b.tensors[i]).cwiseAbs().maxCoeff()) / scale;
    if (difference > worst) {
      worst = difference;
      where = a.names[i];
    }
  }
  return worst;
}

template <typename T>
double max_loss_difference(const Run<T>& a, const Run<T>& b) {
  REQUIRE(a.losses.size() == b.losses.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.losses.size(); ++i) {
    worst = std::max(worst, std::abs(double(a.losses[i]) - double(b.losses[i])) / std::abs(double(b.losses[i])));
  }
  return worst;
}

// Whether `count` values at a and b hold the same bits (no pointer is read when count is 0: an
// empty vector's data() may be null, which memcmp must not be given).
template <typename T>
bool same_bits(const T* a, const T* b, std::size_t count) {
  return count == 0 || std::memcmp(a, b, sizeof(T) * count) == 0;
}

// The first tensor (or loss) whose bits differ, or "".
template <typename T>
std::string first_bit_difference(const Run<T>& a, const Run<T>& b) {
  if (a.names != b.names) return "(the runs hold different tensors)";
  for (std::size_t i = 0; i < a.tensors.size(); ++i) {
    if (a.tensors[i].size() != b.tensors[i].size() ||
        !same_bits(a.tensors[i].data(), b.tensors[i].data(), std::size_t(a.tensors[i].size()))) {
      return a.names[i];
    }
  }
  if (a.losses.size() != b.losses.size() || !same_bits(a.losses.data(), b.losses.data(), a.losses.size())) {
    return "the losses";
  }
  return "";
}

// The rounding tolerance of a data-parallel run against one rank: the shards' sums round
// differently from the whole batch's, and Adam's normalisation carries the difference into W.
template <typename T>
double tolerance() {
  return std::is_same<T, double>::value ? 1e-12 : 1e-5;
}

const std::vector<std::vector<Index>> kSplits = {{24}, {12, 12}, {6, 6, 6, 6}, {3, 9, 5, 7}};

std::string split_text(const std::vector<Index>& shards) {
  std::string text;
  for (Index rows : shards) text += (text.empty() ? "" : " + ") + std::to_string(rows);
  return text + " rows";
}

// Trains `s` on 1, 2 and 4 ranks (equal shards and an unequal split) and checks each against one
// process on the whole batch, and every rank against rank 0 bit for bit.
template <typename T>
void check_against_one_process(const Setup& s) {
  const std::vector<Batch<T>> batches = make_batches<T>(s.steps);
  const Run<T> whole = train<T>(s, batches, nullptr);
  for (const std::vector<Index>& shards : kSplits) {
    CAPTURE(split_text(shards));
    const std::vector<Run<T>> runs = train_ranks<T>(s, batches, shards);
    for (std::size_t r = 1; r < runs.size(); ++r) {
      CAPTURE(r);
      CHECK(first_bit_difference(runs[r], runs[0]) == "");
    }
    std::string where;
    const double difference = max_relative_difference(runs[0], whole, where);
    const double loss_difference = max_loss_difference(runs[0], whole);
    MESSAGE(split_text(shards) << ": max relative difference from one process " << difference << " (" << where
                               << "), of the losses " << loss_difference);
    CHECK(difference <= tolerance<T>());
    CHECK(loss_difference <= tolerance<T>());
  }
}

}  // namespace

TEST_CASE_TEMPLATE("1, 2 and 4 ranks on shards of each batch train ReLoRA (warm start, restarts) as one process on "
                   "the whole batch",
                   T, double, float) {
  check_against_one_process<T>(Setup{});
}

TEST_CASE_TEMPLATE("1, 2 and 4 ranks train LoRA with LoRA+ groups as one process on the whole batch", T, double,
                   float) {
  check_against_one_process<T>(Setup{.method = TrainingMethod::lora, .lora_plus_ratio = 4, .steps = 12});
}

TEST_CASE("DoRA layers (detached and exact gradients) train data-parallel as one process on the whole batch") {
  check_against_one_process<double>(Setup{.dora = true});
}

TEST_CASE_TEMPLATE("with dropout, 1, 2 and 4 ranks draw the rows of the whole batch's masks and train as one process",
                   T, double, float) {
  check_against_one_process<T>(Setup{.dropout = 0.25});
}

TEST_CASE("DoRA layers with dropout train data-parallel as one process on the whole batch") {
  check_against_one_process<double>(Setup{.dora = true, .dropout = 0.25});
}

TEST_CASE("GaLore trains data-parallel as one process: its SVDs take the gradients summed over the ranks") {
  // Full fine-tuning with every weight projected, an SVD every 3 steps: each rank takes the
  // subspace of the summed gradient, one process's gradient to rounding, so the same subspace.
  check_against_one_process<double>(Setup{.method = TrainingMethod::full_finetune, .galore = true, .steps = 10});
}

TEST_CASE("a dropout mask drawn from a row offset is those rows of the whole batch's mask") {
  auto backend = make_backend<double>(Device::cpu);
  const Index rows = 24, cols = 7, first_row = 9, shard_rows = 5;
  Tensor<double> whole = backend->allocate(rows, cols), part = backend->allocate(shard_rows, cols);
  const RngKey key{3, 4};
  backend->dropout_mask(key, 0.5, whole);
  RngKey offset = key;
  offset.first = std::uint64_t(first_row * cols);
  backend->dropout_mask(offset, 0.5, part);
  const HostMatrix<double> w = to_host(*backend, whole), p = to_host(*backend, part);
  CHECK(p == w.middleRows(first_row, shard_rows));
  CHECK(p != w.topRows(shard_rows));  // the offset matters: not the first rows again
}

TEST_CASE("one rank with a communicator trains as the trainer without one, bit for bit") {
  const Setup s;
  const std::vector<Batch<double>> batches = make_batches<double>(s.steps);
  const Run<double> alone = train<double>(s, batches, nullptr);
  const std::vector<Run<double>> group = train_ranks<double>(s, batches, {kRows});
  CHECK(first_bit_difference(group[0], alone) == "");
}

TEST_CASE("a bf16 base trains data-parallel: the ranks stay identical through the warm start and the restarts") {
  // W trains through its fp32 master in the warm start and is rounded to bf16 for every forward:
  // a rounding the shards' sums change can move W by a bf16 step, so one process is matched
  // loosely, the ranks to the bit.
  const Setup s{.base = BasePrecision::bf16};
  const std::vector<Batch<float>> batches = make_batches<float>(s.steps);
  const Run<float> whole = train<float>(s, batches, nullptr);
  const std::vector<Run<float>> runs = train_ranks<float>(s, batches, {3, 9, 5, 7});
  for (std::size_t r = 1; r < runs.size(); ++r) CHECK(first_bit_difference(runs[r], runs[0]) == "");
  const double loss_difference = max_loss_difference(runs[0], whole);
  MESSAGE("bf16 base, 4 ranks: max relative difference of the losses from one process " << loss_difference);
  CHECK(loss_difference <= 1e-3);
}

TEST_CASE("bf16 activations train data-parallel: the ranks stay identical, one process matched to bf16's rounding") {
  // Each rank's loss rounds its gradient 2 (y - t) / rows to bf16 from its own rows' count, one
  // process from the whole batch's: where the ratio of the two is not a power of two the roundings
  // differ by up to a bf16 unit (2^-8 relative), and so do the updates they make.
  const Setup s{.method = TrainingMethod::lora, .activations = BasePrecision::bf16, .steps = 12};
  const std::vector<Batch<float>> batches = make_batches<float>(s.steps);
  const Run<float> whole = train<float>(s, batches, nullptr);
  for (const std::vector<Index>& shards : kSplits) {
    CAPTURE(split_text(shards));
    const std::vector<Run<float>> runs = train_ranks<float>(s, batches, shards);
    for (std::size_t r = 1; r < runs.size(); ++r) CHECK(first_bit_difference(runs[r], runs[0]) == "");
    std::string where;
    const double difference = max_relative_difference(runs[0], whole, where);
    const double loss_difference = max_loss_difference(runs[0], whole);
    MESSAGE("bf16 activations, " << split_text(shards) << ": max relative difference from one process " << difference
                                 << " (" << where << "), of the losses " << loss_difference);
    // Shards of 24, 12 or 6 rows scale the gradient by a power of two, which rounds alike: fp32's
    // tolerance. Otherwise two bf16 units (2^-7) for the state, and the losses within 1e-3.
    const bool power_of_two = std::all_of(shards.begin(), shards.end(), [](Index rows) {
      return kRows % rows == 0 && ((kRows / rows) & (kRows / rows - 1)) == 0;
    });
    CHECK(difference <= (power_of_two ? tolerance<float>() : 0x1.0p-7));
    CHECK(loss_difference <= (power_of_two ? tolerance<float>() : 1e-3));
  }
}

namespace {

// Forwards to another communicator, calling `on_reduce` with each all-reduce's buffer first.
template <typename T>
class WatchedCommunicator final : public Communicator<T> {
 public:
  WatchedCommunicator(std::shared_ptr<Communicator<T>> inner, std::function<void(const T*, Index)> on_reduce)
      : inner_(std::move(inner)), on_reduce_(std::move(on_reduce)) {}
  const char* kind() const override { return inner_->kind(); }
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  Device device() const override { return inner_->device(); }
  void all_reduce_sum(T* data, Index count, T scale) override {
    on_reduce_(data, count);
    inner_->all_reduce_sum(data, count, scale);
  }
  void broadcast(T* data, Index count, int root) override { inner_->broadcast(data, count, root); }
  void wait() override { inner_->wait(); }
  void barrier() override { inner_->barrier(); }
  void abort(const std::string& reason) override { inner_->abort(reason); }

 private:
  std::shared_ptr<Communicator<T>> inner_;
  std::function<void(const T*, Index)> on_reduce_;
};

}  // namespace

TEST_CASE("each layer's bucket is summed as its backward ends, before the layers below run, and feeds the optimizer") {
  // One rank (weight 1: the bucket holds the layer's own gradients). At each all-reduce the
  // watcher keeps layer 0's own gradient of A: at the top two layers' sums it must still hold the
  // last step's (layer 0 has not run), at layer 0's this step's.
  const Setup s{.method = TrainingMethod::lora, .steps = 3};
  const std::vector<Batch<double>> batches = make_batches<double>(s.steps);
  run_ranks<double>(1, [&](const std::shared_ptr<Communicator<double>>& threads) {
    auto backend = make_backend<double>(Device::cpu);
    Model<double> model(backend);
    build(model, s);
    const Tensor<double>* layer0_dA = model.layer(0).parameters("layers.0")[0].grad;
    struct Reduce {
      const double* data;
      Index count;
      HostMatrix<double> layer0_dA;
    };
    std::vector<Reduce> reduces;
    auto watched = std::make_shared<WatchedCommunicator<double>>(threads, [&](const double* data, Index count) {
      reduces.push_back({data, count, to_host(*backend, *layer0_dA)});
    });
    Trainer<double> trainer(model, trainer_config(s), nullptr, nullptr, watched);
    HostMatrix<double> last_dA = to_host(*backend, *layer0_dA);
    for (int step = 0; step < s.steps; ++step) {
      CAPTURE(step);
      reduces.clear();
      Tensor<double> X = shard(*backend, batches[std::size_t(step)].X, 0, kRows);
      Tensor<double> Y = shard(*backend, batches[std::size_t(step)].Y, 0, kRows);
      trainer.step(X, Y);
      // The first step also sums the row count (one element) before the buckets.
      const std::size_t first = step == 0 ? 1 : 0;
      REQUIRE(reduces.size() == first + 3);
      if (step == 0) CHECK(reduces[0].count == 1);
      const HostMatrix<double> dA = to_host(*backend, *layer0_dA);
      CHECK(reduces[first + 2].layer0_dA == dA);  // layer 0's bucket, after its backward
      if (step > 0) {  // (before the first step the gradient's memory holds anything, NaN included)
        CHECK(reduces[first].layer0_dA == last_dA);      // layer 2's bucket
        CHECK(reduces[first + 1].layer0_dA == last_dA);  // layer 1's
        CHECK(dA != last_dA);
      }
      last_dA = dA;
      // Every parameter the optimizer steps reads its gradient from its layer's bucket (the top
      // layer's first), holding the layer's own gradient.
      Optimizer<double>& optimizer = trainer.optimizer();
      REQUIRE(optimizer.size() == 7);  // A and B of each layer, and layer 0's bias
      for (std::size_t j = 0; j < optimizer.size(); ++j) {
        const Parameter<double>& p = optimizer.parameter(j);
        CAPTURE(p.name);
        const std::size_t layer = std::size_t(p.name[7] - '0');  // "layers.<i>...."
        const Reduce& bucket = reduces[first + 2 - layer];
        CHECK(p.grad->data() >= bucket.data);
        CHECK(p.grad->data() + p.grad->size() <= bucket.data + bucket.count);
        const Parameter<double>* own = nullptr;
        const std::vector<Parameter<double>> owns = model.parameters();
        for (const Parameter<double>& q : owns) {
          if (q.name == p.name) own = &q;
        }
        REQUIRE(own != nullptr);
        CHECK(own->grad != p.grad);
        CHECK(to_host(*backend, *p.grad) == to_host(*backend, *own->grad));
      }
    }
    // The loss rides in the top layer's bucket, after its gradients.
    CHECK(trainer.loss() == trainer.loss_function().value());
  });
}

TEST_CASE("the batch's row count is summed when this rank's changes, not every step") {
  const Setup s{.method = TrainingMethod::lora, .steps = 4};
  const std::vector<Batch<float>> batches = make_batches<float>(s.steps);
  run_ranks<float>(2, [&](const std::shared_ptr<Communicator<float>>& threads) {
    auto backend = make_backend<float>(Device::cpu);
    Model<float> model(backend);
    build(model, s);
    std::vector<Index> counts;
    auto watched = std::make_shared<WatchedCommunicator<float>>(threads, [&](const float*, Index count) {
      counts.push_back(count);
    });
    Trainer<float> trainer(model, trainer_config(s), nullptr, nullptr, watched);
    // Rank 0 takes 10 rows, then 10, then 4; rank 1 the rest of the 24, then of the first 20.
    const Index rank0_rows[] = {10, 10, 4};
    const Index batch_rows[] = {24, 24, 20};
    std::vector<std::size_t> reduces_per_step;
    for (int step = 0; step < 3; ++step) {
      const Index rows = threads->rank() == 0 ? rank0_rows[step] : batch_rows[step] - rank0_rows[step];
      const Index begin = threads->rank() == 0 ? 0 : rank0_rows[step];
      counts.clear();
      Tensor<float> X = shard(*backend, batches[std::size_t(step)].X, begin, rows);
      Tensor<float> Y = shard(*backend, batches[std::size_t(step)].Y, begin, rows);
      trainer.step(X, Y);
      reduces_per_step.push_back(counts.size());
      CHECK(trainer.gradient_buckets()->global_rows() == batch_rows[step]);
      CHECK(trainer.gradient_buckets()->weight() == float(rows) / float(batch_rows[step]));
    }
    CHECK(reduces_per_step == std::vector<std::size_t>{4, 3, 4});
  });
}

TEST_CASE("a NaN in one rank's batch: every rank refuses the step, stays as it was and identical, and trains on") {
  const Setup s{.method = TrainingMethod::lora, .steps = 6};
  const std::vector<Batch<double>> batches = make_batches<double>(s.steps);
  std::vector<std::string> refused(2);
  std::vector<Run<double>> before(2), after(2), end(2);
  run_ranks<double>(2, [&](const std::shared_ptr<Communicator<double>>& comm) {
    const std::size_t r = std::size_t(comm->rank());
    auto backend = make_backend<double>(Device::cpu);
    Model<double> model(backend);
    build(model, s);
    Trainer<double> trainer(model, trainer_config(s), nullptr, nullptr, comm);
    for (int step = 0; step < s.steps; ++step) {
      Tensor<double> X = shard(*backend, batches[std::size_t(step)].X, Index(r) * 12, 12);
      Tensor<double> Y = shard(*backend, batches[std::size_t(step)].Y, Index(r) * 12, 12);
      if (step == 3 && r == 1) {
        HostMatrix<double> bad = batches[std::size_t(step)].X.middleRows(12, 12);
        bad(5, 2) = std::numeric_limits<double>::quiet_NaN();
        backend->upload(bad.data(), X);  // past upload()'s finiteness check, as a device-side NaN would be
      }
      if (step == 3) keep_state(before[r], trainer);
      try {
        trainer.step(X, Y);
      } catch (const NonFiniteError& e) {
        refused[r] = std::to_string(step) + ": " + e.what();
        keep_state(after[r], trainer);
      }
      comm->barrier();  // a rank that failed before the sums would show here, not go on out of step
    }
    keep_state(end[r], trainer);
  });
  for (std::size_t r = 0; r < 2; ++r) {
    CAPTURE(r);
    CHECK(refused[r].rfind("3: ", 0) == 0);  // both ranks refused step 3, and no other
    CHECK(first_bit_difference(after[r], before[r]) == "");
  }
  CHECK(first_bit_difference(end[1], end[0]) == "");
}

TEST_CASE("a bad shape on one rank fails every rank with its error, and none hangs") {
  const Setup s{.method = TrainingMethod::relora, .steps = 5};
  const std::vector<Batch<float>> batches = make_batches<float>(s.steps);
  std::mutex mutex;
  std::vector<std::string> messages(3);
  const RankFunction<float> work = [&](const std::shared_ptr<Communicator<float>>& comm) {
    try {
      auto backend = make_backend<float>(Device::cpu);
      Model<float> model(backend);
      build(model, s);
      Trainer<float> trainer(model, trainer_config(s), nullptr, nullptr, comm);
      for (int step = 0; step < s.steps; ++step) {
        const HostMatrix<float>& Y = batches[std::size_t(step)].Y;
        Tensor<float> X = shard(*backend, batches[std::size_t(step)].X, comm->rank() * 8, 8);
        // Rank 1's target loses a column at step 2.
        Tensor<float> target = to_backend<float>(
            *backend, step == 2 && comm->rank() == 1 ? HostMatrix<float>(Y.block(8, 0, 8, kOut - 1)) : HostMatrix<float>(Y.middleRows(comm->rank() * 8, 8)), "Y");
        trainer.step(X, target);
      }
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(mutex);
      messages[std::size_t(comm->rank())] = e.what();
      throw;
    }
  };
  CHECK_THROWS_AS(run_ranks<float>(3, work), ShapeError);
  INFO("rank 1: " << messages[1]);
  CHECK(messages[1].find("[8 x 2]") != std::string::npos);  // the loss names the bad target's shape
  for (std::size_t r : {0, 2}) CHECK(messages[r] == "rank 1 aborted: " + messages[1]);
}

TEST_CASE("the communicator must work on the model's device") {
  auto backend = make_backend<float>(Device::cpu);
  Model<float> model(backend);
  build(model, Setup{});
  struct CudaLike final : public Communicator<float> {
    const char* kind() const override { return "nccl"; }
    int rank() const override { return 0; }
    int size() const override { return 1; }
    Device device() const override { return Device::cuda; }
    void all_reduce_sum(float*, Index, float) override {}
    void broadcast(float*, Index, int) override {}
    void wait() override {}
    void barrier() override {}
    void abort(const std::string&) override {}
  };
  CHECK_THROWS_WITH_AS(Trainer<float>(model, TrainerConfig{}, nullptr, nullptr, std::make_shared<CudaLike>()),
                       "GradientBuckets: the communicator ('nccl') works on cuda buffers but the model's backend is cpu",
                       ConfigError);
}

// ---- checkpoints of a group

namespace {

// Rank r's trainer of setup s, its model and backend with it.
template <typename T>
struct RankTrainer {
  std::shared_ptr<Backend<T>> backend = make_backend<T>(Device::cpu);
  Model<T> model{backend};
  std::unique_ptr<Trainer<T>> trainer;
  RankTrainer(const Setup& s, std::shared_ptr<Communicator<T>> comm) {
    build(model, s);
    const TrainerConfig config = trainer_config(s);
    auto schedule = std::make_shared<JaggedCosineSchedule>(jagged_schedule(config.relora, s.steps, 2, 0.1));
    trainer = std::make_unique<Trainer<T>>(model, config, schedule, nullptr, std::move(comm));
  }
  void steps(const std::vector<Batch<T>>& batches, int from, int to, int rank, Index rows) {
    for (int step = from; step < to; ++step) {
      Tensor<T> X = shard(*backend, batches[std::size_t(step)].X, rank * rows, rows);
      Tensor<T> Y = shard(*backend, batches[std::size_t(step)].Y, rank * rows, rows);
      trainer->step(X, Y);
    }
  }
};

}  // namespace

TEST_CASE("a checkpoint of a group: rank 0 writes it, every rank loads it, and the resumed run is the straight one") {
  relora::testing::TempDir dir;
  const std::string path = dir.file("group.safetensors");
  const Setup s;  // ReLoRA: saved after 9 steps, between the restarts after steps 7 and 11
  const std::vector<Batch<double>> batches = make_batches<double>(s.steps);
  std::vector<Run<double>> straight(2), resumed(2);
  std::vector<std::vector<std::string>> files_after_save(2);
  run_ranks<double>(2, [&](const std::shared_ptr<Communicator<double>>& comm) {
    const int r = comm->rank();
    RankTrainer<double> first(s, comm);
    first.steps(batches, 0, 9, r, 12);
    save_checkpoint(path, *first.trainer, *comm);
    files_after_save[std::size_t(r)] = dir.entries();  // every rank returns once the file is in place
    first.steps(batches, 9, s.steps, r, 12);
    keep_state(straight[std::size_t(r)], *first.trainer);

    RankTrainer<double> second(s, comm);
    load_checkpoint(path, *second.trainer, *comm);
    CHECK(second.trainer->steps_done() == 9);
    second.steps(batches, 9, s.steps, r, 12);
    keep_state(resumed[std::size_t(r)], *second.trainer);
  });
  for (std::size_t r = 0; r < 2; ++r) {
    CAPTURE(r);
    CHECK(files_after_save[r] == std::vector<std::string>{"group.safetensors"});
    CHECK(first_bit_difference(resumed[r], straight[r]) == "");
  }
  CHECK(first_bit_difference(straight[1], straight[0]) == "");
}

TEST_CASE("a checkpoint rank 0 cannot write fails on every rank; one a rank cannot load changes no rank") {
  relora::testing::TempDir dir;
  const Setup s{.steps = 4};
  const std::vector<Batch<float>> batches = make_batches<float>(s.steps);
  const std::string unwritable = dir.file("no_such_dir/x.safetensors");
  const std::string good = dir.file("good.safetensors");
  std::vector<std::string> save_errors(2), load_errors(2);
  std::vector<bool> unchanged(2);
  run_ranks<float>(2, [&](const std::shared_ptr<Communicator<float>>& comm) {
    const int r = comm->rank();
    RankTrainer<float> rank(s, comm);
    rank.steps(batches, 0, 2, r, 12);
    try {
      save_checkpoint(unwritable, *rank.trainer, *comm);
    } catch (const IoError& e) {
      save_errors[std::size_t(r)] = e.what();
    }
    save_checkpoint(good, *rank.trainer, *comm);
    rank.steps(batches, 2, 4, r, 12);
    const std::vector<std::uint8_t> state = serialize_checkpoint(*rank.trainer);
    // Rank 1 is given a path it cannot read; rank 0 loads the good file, then puts its state back.
    try {
      load_checkpoint(r == 0 ? good : dir.file("missing.safetensors"), *rank.trainer, *comm);
    } catch (const IoError& e) {
      load_errors[std::size_t(r)] = e.what();
    }
    unchanged[std::size_t(r)] = serialize_checkpoint(*rank.trainer) == state;
    rank.steps(batches, 2, 4, r, 12);  // the group still works
  });
  INFO("rank 0's save error: " << save_errors[0]);
  CHECK(save_errors[0].find(unwritable) != std::string::npos);
  CHECK(save_errors[1] == unwritable + ": rank 0 could not write the checkpoint: " + save_errors[0]);
  INFO("rank 1's load error: " << load_errors[1]);
  CHECK(load_errors[1].find("missing.safetensors") != std::string::npos);
  CHECK(load_errors[0] == good + ": rank 1 could not load the checkpoint: " + load_errors[1]);
  CHECK(unchanged == std::vector<bool>{true, true});
}

// ---- broadcast_parameters

TEST_CASE("broadcast_parameters makes every rank's model rank 0's, and the ranks then train identically") {
  // Rank 0 draws its base weights from the seeds; the others are given other weights (their random
  // streams stand elsewhere, too). After the broadcast the ranks restart in step: the same A.
  const Setup s;
  const std::vector<Batch<double>> batches = make_batches<double>(s.steps);
  std::vector<Run<double>> broadcast(3), trained(3);
  std::vector<std::string> differs_before(3);
  run_ranks<double>(3, [&](const std::shared_ptr<Communicator<double>>& comm) {
    const std::size_t r = std::size_t(comm->rank());
    auto backend = make_backend<double>(Device::cpu);
    Model<double> model(backend);
    if (r == 0) {
      build(model, s);
    } else {
      std::mt19937_64 gen(100 + r);
      std::uint64_t seed = 11;
      for (const auto& [k, d, f, bias] : {std::tuple{kIn, Index(8), Activation::relu, BiasMode::trainable},
                                          std::tuple{Index(8), Index(7), Activation::tanh, BiasMode::frozen},
                                          std::tuple{Index(7), kOut, Activation::identity, BiasMode::none}}) {
        const LoraConfig config{.in_features = k, .out_features = d, .rank = 2, .alpha = 4, .bias = bias, .seed = seed++,
                                .base_merge = BaseMerge::fp32_master};
        model.add(config, f, normal_matrix<double>(d, k, gen));
      }
    }
    const TrainerConfig config = trainer_config(s);
    auto schedule = std::make_shared<JaggedCosineSchedule>(jagged_schedule(config.relora, s.steps, 2, 0.1));
    Trainer<double> trainer(model, config, schedule, nullptr, comm);
    keep_state(broadcast[r], trainer);
    comm->barrier();  // rank 0's record is kept before any rank compares with it
    differs_before[r] = r == 0 ? "" : first_bit_difference(broadcast[r], broadcast[0]);
    comm->barrier();
    broadcast_parameters(model, *comm);
    keep_state(broadcast[r], trainer);
    for (int step = 0; step < s.steps; ++step) {
      Tensor<double> X = shard(*backend, batches[std::size_t(step)].X, Index(r) * 8, 8);
      Tensor<double> Y = shard(*backend, batches[std::size_t(step)].Y, Index(r) * 8, 8);
      trainer.step(X, Y);
    }
    keep_state(trained[r], trainer);
  });
  for (std::size_t r = 1; r < 3; ++r) {
    CAPTURE(r);
    CHECK(differs_before[r] != "");
    CHECK(first_bit_difference(broadcast[r], broadcast[0]) == "");
    CHECK(first_bit_difference(trained[r], trained[0]) == "");
  }
}

TEST_CASE("broadcast_parameters refuses, on every rank and changing nothing, a rank whose layers are configured "
          "otherwise") {
  std::vector<std::string> errors(2);
  std::vector<bool> unchanged(2);
  run_ranks<float>(2, [&](const std::shared_ptr<Communicator<float>>& comm) {
    const int r = comm->rank();
    auto backend = make_backend<float>(Device::cpu);
    Model<float> model(backend);
    model.add(LoraConfig{.in_features = 4, .out_features = 3, .rank = 2, .seed = std::uint64_t(r == 1 ? 99 : 1)},
              Activation::identity);
    const HostMatrix<float> W = to_host(*backend, model.lora(0).W());
    try {
      broadcast_parameters(model, *comm);
    } catch (const ConfigError& e) {
      errors[std::size_t(r)] = e.what();
    }
    unchanged[std::size_t(r)] = to_host(*backend, model.lora(0).W()) == W;
  });
  for (const std::string& e : errors) {
    CHECK(e == "broadcast_parameters: rank 1: layer 0 ('layers.0') does not match rank 0's: config field 'seed' is 1 "
               "in the checkpoint but 99 in the model");
  }
  CHECK(unchanged == std::vector<bool>{true, true});
}

TEST_CASE("broadcast_parameters sends a bf16 base's bits and its fp32 master") {
  std::vector<Run<float>> before(2), after(2);
  run_ranks<float>(2, [&](const std::shared_ptr<Communicator<float>>& comm) {
    const std::size_t r = std::size_t(comm->rank());
    auto backend = make_backend<float>(Device::cpu);
    Model<float> model(backend);
    std::mt19937_64 gen(3 + r);  // another W on each rank
    model.add(LoraConfig{.in_features = 6, .out_features = 5, .rank = 2, .seed = 4,
                         .base_precision = BasePrecision::bf16, .base_merge = BaseMerge::fp32_master},
              Activation::identity, normal_matrix<float>(5, 6, gen));
    Trainer<float> trainer(model, TrainerConfig{}, nullptr, nullptr, comm);
    keep_state(before[r], trainer);
    broadcast_parameters(model, *comm);
    keep_state(after[r], trainer);
  });
  const auto tensor = [](const Run<float>& run, const std::string& name) {
    for (std::size_t i = 0; i < run.names.size(); ++i) {
      if (run.names[i] == name) return run.tensors[i];
    }
    FAIL("no tensor " << name);
    return HostMatrix<float>();
  };
  for (const char* name : {"layers.0.weight", "layers.0.weight_master"}) {  // the bf16 bits, the master
    CAPTURE(name);
    CHECK(tensor(before[1], name) != tensor(before[0], name));
    CHECK(tensor(after[1], name) == tensor(after[0], name));
  }
  CHECK(first_bit_difference(after[1], after[0]) == "");
}
