// Training checkpoints: 300 steps straight and k steps + save + load into a fresh model and
// trainer + 300 - k steps agree bit for bit (losses at every step, final weights and optimizer
// state) for LoRA, ReLoRA across restarts, re-warmups and a warm start, with dropout; every kind
// of bad file is rejected with a message naming what was wrong, and leaves the trainer untouched.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "relora/io/atomic_file.hpp"
#include "relora/io/checkpoint.hpp"
#include "relora/io/checksum.hpp"
#include "relora/relora.hpp"
#include "test_support.hpp"
#include "relora/io/safetensors.hpp"
#include "test_data.hpp"

using namespace relora;
using relora::testing::normal_matrix;
namespace fs = std::filesystem;
using relora::testing::TempDir;

namespace {

// The model's shape and its per-layer LoRA settings; `weights_seed` draws W and b, so a "fresh"
// model has other weights than the one that was saved.
struct Setup {
  Index hidden = 10;
  Index rank = 3;
  double alpha = 6;
  double dropout = 0.1;
  bool rslora = false;
  std::uint64_t lora_seed = 7;
  bool dora = false;  // DoraLinear layers of the same LoRA configs
  DoraGradient dora_gradient = DoraGradient::detached;
};

template <typename T>
std::unique_ptr<Model<T>> build_model(const Setup& s, std::uint64_t weights_seed,
                                      std::shared_ptr<Backend<T>> backend = make_backend<T>(Device::cpu)) {
  std::mt19937_64 gen(weights_seed);
  auto model = std::make_unique<Model<T>>(backend);
  const auto cfg = [&](Index k, Index d, Index r, BiasMode bias, double dropout, std::uint64_t seed) {
    return LoraConfig{.in_features = k, .out_features = d, .rank = r, .alpha = s.alpha, .rslora = s.rslora,
                      .dropout = dropout, .bias = bias, .seed = seed};
  };
  if (s.dora) {
    const auto dora = [&](const LoraConfig& lora) { return DoraConfig{.lora = lora, .gradient = s.dora_gradient}; };
    const HostMatrix<T> W1 = normal_matrix<T>(s.hidden, 6, gen, 0.4), b1 = normal_matrix<T>(s.hidden, 1, gen, 0.1);
    const HostMatrix<T> W2 = normal_matrix<T>(8, s.hidden, gen, 0.3), b2 = normal_matrix<T>(8, 1, gen, 0.1);
    const HostMatrix<T> W3 = normal_matrix<T>(4, 8, gen, 0.3);
    model->add(std::make_unique<DoraLinear<T>>(*backend, dora(cfg(6, s.hidden, s.rank, BiasMode::trainable, s.dropout,
                                                                  s.lora_seed)),
                                               W1, b1.col(0)),
               Activation::relu, "fc1");
    model->add(std::make_unique<DoraLinear<T>>(
                   *backend, dora(cfg(s.hidden, 8, 2, BiasMode::frozen, s.dropout, s.lora_seed + 1)), W2, b2.col(0)),
               Activation::tanh, "fc2");
    model->add(std::make_unique<DoraLinear<T>>(*backend, dora(cfg(8, 4, 2, BiasMode::none, 0.0, s.lora_seed + 2)), W3),
               Activation::identity, "head");
    return model;
  }
  model->add(cfg(6, s.hidden, s.rank, BiasMode::trainable, s.dropout, s.lora_seed), Activation::relu,
             normal_matrix<T>(s.hidden, 6, gen, 0.4), normal_matrix<T>(s.hidden, 1, gen, 0.1).col(0), "fc1");
  model->add(cfg(s.hidden, 8, 2, BiasMode::frozen, s.dropout, s.lora_seed + 1), Activation::tanh,
             normal_matrix<T>(8, s.hidden, gen, 0.3), normal_matrix<T>(8, 1, gen, 0.1).col(0), "fc2");
  model->add(cfg(8, 4, 2, BiasMode::none, 0.0, s.lora_seed + 2), Activation::identity, normal_matrix<T>(4, 8, gen, 0.3),
             "head");
  return model;
}

struct Run {
  TrainerConfig config;
  // A fresh schedule per trainer, or null.
  std::function<std::shared_ptr<Schedule>()> schedule;
};

template <typename T>
struct Data {
  std::vector<HostMatrix<T>> X, Y;
  Data() {
    std::mt19937_64 gen(99);
    const HostMatrix<T> teacher = normal_matrix<T>(4, 6, gen);
    for (int b = 0; b < 4; ++b) {
      X.push_back(normal_matrix<T>(16, 6, gen));
      Y.push_back((X.back() * teacher.transpose()).array().sin().matrix());
    }
  }
};

template <typename T>
void train(Trainer<T>& trainer, const Data<T>& data, std::int64_t from, std::int64_t to, std::vector<T>& losses) {
  Backend<T>& backend = trainer.model().backend();
  std::vector<Tensor<T>> X, Y;
  for (std::size_t b = 0; b < data.X.size(); ++b) {
    X.push_back(to_backend<T>(backend, data.X[b], "X"));
    Y.push_back(to_backend<T>(backend, data.Y[b], "Y"));
  }
  for (std::int64_t step = from; step < to; ++step) {
    REQUIRE(trainer.steps_done() == step);
    const std::size_t b = static_cast<std::size_t>(step) % X.size();
    trainer.step(X[b], Y[b]);
    losses.push_back(trainer.loss());
  }
}

template <typename T>
bool bitwise_equal(const HostMatrix<T>& a, const HostMatrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

// Straight run of `total` steps vs `split` steps, save, load into a fresh model and trainer, and
// the rest. Losses at every step, every layer's tensors and the optimizer state must agree bit
// for bit; the file written at the end of both runs must be the same bytes.
template <typename T>
void check_resume(const Run& run, std::int64_t split, std::int64_t total = 300, const Setup& setup = {}) {
  CAPTURE(split);
  const Data<T> data;
  TempDir dir;

  auto straight_model = build_model<T>(setup, 1);
  Trainer<T> straight(*straight_model, run.config, run.schedule ? run.schedule() : nullptr);
  std::vector<T> straight_losses;
  train(straight, data, 0, total, straight_losses);

  std::vector<T> resumed_losses;
  {
    auto first_model = build_model<T>(setup, 1);
    Trainer<T> first(*first_model, run.config, run.schedule ? run.schedule() : nullptr);
    train(first, data, 0, split, resumed_losses);
    save_checkpoint(dir.file("ckpt.safetensors"), first);
  }
  auto fresh_model = build_model<T>(setup, 12345);  // other weights: the load must replace them all
  Trainer<T> resumed(*fresh_model, run.config, run.schedule ? run.schedule() : nullptr);
  load_checkpoint(dir.file("ckpt.safetensors"), resumed);
  CHECK(resumed.steps_done() == split);
  train(resumed, data, split, total, resumed_losses);

  REQUIRE(resumed_losses.size() == straight_losses.size());
  std::size_t first_difference = straight_losses.size();
  for (std::size_t i = 0; i < straight_losses.size(); ++i) {
    if (std::memcmp(&straight_losses[i], &resumed_losses[i], sizeof(T)) != 0) {
      first_difference = i;
      break;
    }
  }
  INFO("first differing step " << first_difference << ": straight "
                               << (first_difference < straight_losses.size() ? straight_losses[first_difference] : 0)
                               << ", resumed "
                               << (first_difference < resumed_losses.size() ? resumed_losses[first_difference] : 0));
  CHECK(first_difference == straight_losses.size());
  Backend<T>& be = straight_model->backend();
  for (std::size_t i = 0; i < straight_model->size() && !setup.dora; ++i) {  // DoRA's tensors: in the bytes below
    CAPTURE(straight_model->name(i));
    const LoraLinear<T>& a = straight_model->lora(i);
    const LoraLinear<T>& b = fresh_model->lora(i);
    CHECK(bitwise_equal<T>(to_host(be, a.W()), to_host(be, b.W())));
    if (a.has_bias()) CHECK(bitwise_equal<T>(to_host(be, a.b()), to_host(be, b.b())));
    CHECK(bitwise_equal<T>(to_host(be, a.A()), to_host(be, b.A())));
    CHECK(bitwise_equal<T>(to_host(be, a.B()), to_host(be, b.B())));
    CHECK(a.rng_stream() == b.rng_stream());
  }
  if (straight.controller()) {
    CHECK(straight.controller()->restarts_done() == resumed.controller()->restarts_done());
  }
  // Everything else (optimizer moments and counts, schedule, flags) shows in the file's bytes.
  CHECK(serialize_checkpoint(straight) == serialize_checkpoint(resumed));
}

std::shared_ptr<Schedule> jagged(const ReloraConfig& relora, std::int64_t total = 300) {
  return std::make_shared<JaggedCosineSchedule>(jagged_schedule(relora, total, 10, 0.1));
}

Run lora_run() {
  Run run;
  run.config = TrainerConfig{.method = TrainingMethod::lora,
                             .adam = {.lr = 5e-3, .weight_decay = 0.01},
                             .lora_plus_ratio = 4};
  run.schedule = [] {
    return std::make_shared<WarmupCosineSchedule>(WarmupCosineScheduleConfig{.warmup_steps = 20, .total_steps = 300});
  };
  return run;
}

Run relora_run(OptimizerReset reset = OptimizerReset::full, std::int64_t warm_start = 0) {
  Run run;
  run.config = TrainerConfig{.method = TrainingMethod::relora,
                             .adam = {.lr = 5e-3},
                             .relora = {.restart_every = 50,
                                        .reset = reset,
                                        .prune_fraction = 0.9,
                                        .restart_warmup_steps = 20,
                                        .warm_start_steps = warm_start,
                                        .seed = 5}};
  const ReloraConfig relora = run.config.relora;
  run.schedule = [relora] { return jagged(relora); };
  return run;
}

// A trained trainer and its checkpoint bytes, for the rejection tests.
struct Saved {
  Setup setup;
  std::unique_ptr<Model<float>> model;
  std::unique_ptr<Trainer<float>> trainer;
  std::vector<std::uint8_t> bytes;
  explicit Saved(const Run& run = relora_run(), std::int64_t steps = 60) {
    model = build_model<float>(setup, 1);
    trainer = std::make_unique<Trainer<float>>(*model, run.config, run.schedule());
    std::vector<float> losses;
    train(*trainer, Data<float>(), 0, steps, losses);
    bytes = serialize_checkpoint(*trainer);
  }
};

// A target trainer (other weights, 3 steps in) and its state, to show a refused load changed nothing.
struct Target {
  std::unique_ptr<Model<float>> model;
  std::unique_ptr<Trainer<float>> trainer;
  std::vector<std::uint8_t> before;
  explicit Target(const Setup& setup = {}, const Run& run = relora_run()) {
    model = build_model<float>(setup, 777);
    trainer = std::make_unique<Trainer<float>>(*model, run.config, run.schedule());
    std::vector<float> losses;
    train(*trainer, Data<float>(), 0, 3, losses);
    before = serialize_checkpoint(*trainer);
  }
  // Loading `bytes` must throw IoError whose message contains `expected`, and change nothing.
  void require_rejected(const std::vector<std::uint8_t>& bytes, const std::string& expected = "") {
    std::string message;
    try {
      load_checkpoint_from_bytes(bytes.data(), bytes.size(), *trainer, "test.ckpt");
    } catch (const IoError& e) {
      message = e.what();
    }
    INFO("message: " << message);
    REQUIRE_FALSE(message.empty());
    if (!expected.empty()) CHECK(message.find(expected) != std::string::npos);
    CHECK(message.rfind("test.ckpt", 0) == 0);  // names the file first
    CHECK(serialize_checkpoint(*trainer) == before);
  }
};

// Rewrites a checkpoint: tensors kept (or changed by `tensors`), metadata changed by `meta`, and
// the checksum recomputed so that the check under test is the one that refuses it.
std::vector<std::uint8_t> rewrite(const std::vector<std::uint8_t>& bytes,
                                  const std::function<void(std::map<std::string, std::string>&)>& meta,
                                  const std::function<bool(const std::string&)>& keep_tensor = nullptr,
                                  bool fix_checksum = true) {
  const SafetensorsFile file = SafetensorsFile::parse(bytes.data(), bytes.size());
  SafetensorsWriter writer;
  for (const std::string& name : file.names()) {
    if (keep_tensor && !keep_tensor(name)) continue;
    writer.add_raw(name, file.dtype(name), file.shape(name), file.raw_data(name));
  }
  std::map<std::string, std::string> metadata = file.metadata();
  meta(metadata);
  for (const auto& [k, v] : metadata) writer.set_metadata(k, v);
  std::vector<std::uint8_t> out = writer.serialize();
  if (!fix_checksum || !metadata.count("state")) return out;
  const SafetensorsFile again = SafetensorsFile::parse(out.data(), out.size());
  Fnv1a64 hash;
  hash.update(out.data() + again.data_start(), out.size() - again.data_start());
  hash.update(metadata["state"].data(), metadata["state"].size());
  writer.set_metadata("checksum", checksum_hex(hash.value()));
  return writer.serialize();
}

std::vector<std::uint8_t> edit_state(const std::vector<std::uint8_t>& bytes,
                                     const std::function<void(nlohmann::json&)>& edit) {
  return rewrite(bytes, [&](std::map<std::string, std::string>& meta) {
    nlohmann::json state = nlohmann::json::parse(meta.at("state"));
    edit(state);
    meta["state"] = state.dump();
  });
}

}  // namespace

TEST_CASE("checkpoint resume is bit for bit: LoRA with dropout, LoRA+ groups, weight decay, warmup-cosine") {
  check_resume<float>(lora_run(), 150);
  check_resume<float>(lora_run(), 1);
  check_resume<float>(lora_run(), 0);
}

TEST_CASE("checkpoint resume is bit for bit: LoRA in double precision") { check_resume<double>(lora_run(), 150); }

TEST_CASE("checkpoint resume is bit for bit: ReLoRA, restarts every 50, jagged cosine with re-warmup") {
  SUBCASE("saved right at a restart") { check_resume<float>(relora_run(), 150); }
  SUBCASE("saved in the middle of a re-warmup") { check_resume<float>(relora_run(), 160); }
  SUBCASE("saved one step before a restart") { check_resume<float>(relora_run(), 199); }
  SUBCASE("double precision, at a restart") { check_resume<double>(relora_run(), 100); }
}

TEST_CASE("checkpoint resume is bit for bit: ReLoRA with magnitude and random moment pruning") {
  check_resume<float>(relora_run(OptimizerReset::magnitude_prune), 150);
  check_resume<float>(relora_run(OptimizerReset::random_prune), 160);  // the prune-draw counter travels
}

TEST_CASE("checkpoint resume is bit for bit: ReLoRA with a full-rank warm start") {
  const Run run = relora_run(OptimizerReset::full, 30);  // restarts after 80, 130, 180, ...
  SUBCASE("inside the warm start") { check_resume<float>(run, 15); }
  SUBCASE("right as the warm start ends") { check_resume<float>(run, 30); }
  SUBCASE("at a restart") { check_resume<float>(run, 130); }
  SUBCASE("in a re-warmup") { check_resume<float>(run, 145); }
}

TEST_CASE("checkpoint resume is bit for bit: DoRA layers, LoRA and ReLoRA, both gradient modes") {
  const Setup dora{.dora = true};
  const Setup exact{.dora = true, .dora_gradient = DoraGradient::exact};
  SUBCASE("LoRA-style training, dropout") { check_resume<float>(lora_run(), 150, 300, dora); }
  SUBCASE("exact gradient, double precision") { check_resume<double>(lora_run(), 120, 200, exact); }
  SUBCASE("ReLoRA, saved right at a restart") { check_resume<float>(relora_run(), 150, 300, dora); }
  SUBCASE("ReLoRA, saved in a re-warmup") { check_resume<float>(relora_run(OptimizerReset::magnitude_prune), 160, 300, exact); }
  SUBCASE("ReLoRA with a full-rank warm start") { check_resume<float>(relora_run(OptimizerReset::full, 30), 15, 150, dora); }
}

TEST_CASE("checkpoint resume is bit for bit: full fine-tuning, no schedule") {
  Run run;
  run.config = TrainerConfig{.method = TrainingMethod::full_finetune, .adam = {.lr = 2e-3}};
  check_resume<float>(run, 150);
}

TEST_CASE("checkpoint file: format, version, state JSON and checksum in the metadata") {
  Saved saved;
  const SafetensorsFile file = SafetensorsFile::parse(saved.bytes.data(), saved.bytes.size());
  CHECK(file.metadata_value("format") == std::string("relora-checkpoint"));
  CHECK(file.metadata_value("version") == std::string("2"));
  const auto state = nlohmann::json::parse(*file.metadata_value("state"));
  CHECK(state["trainer"]["steps_done"] == 60);
  CHECK(state["controller"]["restarts_done"] == 1);
  CHECK(state["schedule"]["restart_steps"] == nlohmann::json::array({50}));
  CHECK(state["layers"][0]["name"] == "fc1");
  CHECK(state["layers"][0]["config"]["rank"] == 3);
  CHECK(state["layers"][0]["rng_stream"].get<std::uint64_t>() == saved.model->lora(0).rng_stream());
  CHECK(file.contains("model.fc1.weight"));
  CHECK(file.contains("model.fc1.bias"));
  CHECK(file.contains("optim.fc1.lora_A.m"));
  CHECK(file.contains("optim.fc1.bias.step"));
  CHECK_FALSE(file.contains("model.head.bias"));
  Fnv1a64 hash;
  hash.update(saved.bytes.data() + file.data_start(), saved.bytes.size() - file.data_start());
  hash.update(file.metadata_value("state")->data(), file.metadata_value("state")->size());
  CHECK(*file.metadata_value("checksum") == checksum_hex(hash.value()));
}

TEST_CASE("checkpoint: truncated files are rejected at every cut point and leave the trainer untouched") {
  Saved saved;
  Target target;
  const std::size_t size = saved.bytes.size();
  std::vector<std::size_t> cuts{0, 1, 7, 8, 9, 16, 100, size / 2, size - 8, size - 4, size - 1};
  for (std::size_t cut = 3; cut < size; cut += 211) cuts.push_back(cut);
  for (std::size_t cut : cuts) {
    CAPTURE(cut);
    target.require_rejected(std::vector<std::uint8_t>(saved.bytes.begin(), saved.bytes.begin() + cut));
  }
  // Appended garbage is as wrong as a missing tail.
  std::vector<std::uint8_t> longer = saved.bytes;
  longer.push_back(0);
  target.require_rejected(longer);
}

TEST_CASE("checkpoint: a flipped byte anywhere in the file is rejected and leaves the trainer untouched") {
  Saved saved;
  Target target;
  const SafetensorsFile file = SafetensorsFile::parse(saved.bytes.data(), saved.bytes.size());
  int checksum_rejections = 0;
  for (std::size_t at = 0; at < saved.bytes.size(); ++at) {
    for (std::uint8_t mask : {std::uint8_t(0x01), std::uint8_t(0x80)}) {
      if (mask == 0x80 && at % 7 != 0) continue;  // every byte once, a sample twice
      CAPTURE(at);
      std::vector<std::uint8_t> bad = saved.bytes;
      bad[at] ^= mask;
      std::string message;
      try {
        load_checkpoint_from_bytes(bad.data(), bad.size(), *target.trainer, "flip.ckpt");
      } catch (const IoError& e) {
        message = e.what();
      }
      REQUIRE_FALSE(message.empty());
      if (at >= file.data_start()) {
        INFO(message);
        CHECK(message.find("checksum mismatch") != std::string::npos);
        ++checksum_rejections;
      }
    }
  }
  CHECK(checksum_rejections > 0);
  CHECK(serialize_checkpoint(*target.trainer) == target.before);
}

TEST_CASE("checkpoint: wrong format, wrong or missing version, missing or bad checksum") {
  Saved saved;
  Target target;
  target.require_rejected(rewrite(saved.bytes, [](auto& m) { m["version"] = "3"; }),
                          "checkpoint version '3' is not supported: this build reads versions '1' to '2'");
  target.require_rejected(rewrite(saved.bytes, [](auto& m) { m.erase("version"); }), "version absent");
  target.require_rejected(rewrite(saved.bytes, [](auto& m) { m["format"] = "pt"; }), "not a relora checkpoint");
  target.require_rejected(rewrite(saved.bytes, [](auto& m) { m.erase("checksum"); }, nullptr, false),
                          "'checksum' is missing");
  target.require_rejected(rewrite(saved.bytes, [](auto& m) { m["checksum"] = "xyz"; }, nullptr, false),
                          "metadata 'checksum'");
  // The state is covered by the checksum: an edited state with the old checksum is corrupt.
  target.require_rejected(
      rewrite(saved.bytes, [](auto& m) { m["state"].replace(m["state"].find("60"), 2, "61"); }, nullptr, false),
      "checksum mismatch");
  target.require_rejected(rewrite(saved.bytes, [](auto& m) { m["state"] = "{not json"; }), "not valid JSON");
}

TEST_CASE("checkpoint: a model of another shape or config is rejected, naming the layer and the field") {
  Saved saved;
  {
    Setup other;
    other.rank = 4;
    Target target(other);
    target.require_rejected(saved.bytes, "layer 0 ('fc1'): config field 'rank' is 3 in the checkpoint but 4 in the model");
  }
  {
    Setup other;
    other.hidden = 12;
    Target target(other);
    target.require_rejected(saved.bytes, "layer 0 ('fc1'): config field 'out_features' is 10 in the checkpoint but 12");
  }
  {
    Setup other;
    other.alpha = 5;
    Target target(other);
    target.require_rejected(saved.bytes, "config field 'alpha' is 6.0 in the checkpoint but 5.0 in the model");
  }
  {
    Setup other;
    other.dropout = 0.2;
    Target target(other);
    target.require_rejected(saved.bytes, "config field 'dropout'");
  }
  {
    Setup other;
    other.rslora = true;
    Target target(other);
    target.require_rejected(saved.bytes, "config field 'rslora' is false in the checkpoint but true");
  }
  {
    Setup other;
    other.lora_seed = 8;
    Target target(other);
    target.require_rejected(saved.bytes, "config field 'seed' is 7 in the checkpoint but 8");
  }
  {
    Target target({}, lora_run());
    target.require_rejected(saved.bytes, "trained with method 'relora' but the trainer uses 'lora'");
  }
  {
    Run run = relora_run();
    run.config.relora.restart_every = 40;
    run.config.relora.restart_warmup_steps = 10;
    Target target({}, run);
    target.require_rejected(saved.bytes, "'restart_every' is 50 in the checkpoint but 40");
  }
  {
    auto model = build_model<double>({}, 1);
    const Run run = relora_run();
    Trainer<double> trainer(*model, run.config, run.schedule());
    CHECK_THROWS_WITH_AS(load_checkpoint_from_bytes(saved.bytes.data(), saved.bytes.size(), trainer, "x"),
                         doctest::Contains("holds F32 tensors but the trainer trains in F64"), IoError);
  }
}

TEST_CASE("checkpoint: missing tensors, wrong shapes, non-finite values and bad state fields are rejected") {
  Saved saved;
  Target target;
  target.require_rejected(rewrite(saved.bytes, [](auto&) {}, [](const std::string& n) { return n != "model.fc2.lora_B"; }),
                          "tensor 'model.fc2.lora_B' is missing");
  target.require_rejected(rewrite(saved.bytes, [](auto&) {}, [](const std::string& n) { return n != "optim.head.lora_A.v"; }),
                          "tensor 'optim.head.lora_A.v' is missing");
  {  // fc1's A saved as 2 x 6 instead of 3 x 6
    const SafetensorsFile file = SafetensorsFile::parse(saved.bytes.data(), saved.bytes.size());
    auto bad = rewrite(saved.bytes, [](auto&) {}, [](const std::string& n) { return n != "model.fc1.lora_A"; });
    SafetensorsFile partial = SafetensorsFile::parse(bad.data(), bad.size());
    SafetensorsWriter writer;
    for (const std::string& n : partial.names()) writer.add_raw(n, partial.dtype(n), partial.shape(n), partial.raw_data(n));
    writer.add_raw("model.fc1.lora_A", Dtype::F32, {2, 6}, file.raw_data("model.fc1.lora_A"));
    for (const auto& [k, v] : partial.metadata()) writer.set_metadata(k, v);
    target.require_rejected(rewrite(writer.serialize(), [](auto&) {}),
                            "layer 0 ('fc1'): tensor 'model.fc1.lora_A' has shape [2 x 6], expected [3 x 6]");
  }
  {  // a NaN in W
    std::vector<std::uint8_t> bad = saved.bytes;
    const SafetensorsFile file = SafetensorsFile::parse(bad.data(), bad.size());
    const std::size_t at = static_cast<std::size_t>(file.raw_data("model.fc2.weight") - file.bytes().data());
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(bad.data() + at, &nan, sizeof nan);
    target.require_rejected(rewrite(bad, [](auto&) {}), "tensor 'model.fc2.weight' holds NaN or Inf");
  }
  target.require_rejected(edit_state(saved.bytes, [](auto& s) { s["layers"][1]["name"] = "other"; }),
                          "layer 1 ('fc2'): the checkpoint names this layer 'other'");
  target.require_rejected(edit_state(saved.bytes, [](auto& s) { s["layers"][2]["activation"] = "relu"; }),
                          "activation is 'relu' in the checkpoint but 'identity'");
  target.require_rejected(edit_state(saved.bytes, [](auto& s) { s["layers"].erase(2); }),
                          "the checkpoint has 2 layers, the model 3");
  target.require_rejected(edit_state(saved.bytes, [](auto& s) { s["layers"][0]["rng_stream"] = -1; }),
                          "layer 0 ('fc1'): field 'rng_stream' is not a non-negative integer");
  target.require_rejected(edit_state(saved.bytes, [](auto& s) { s["trainer"]["steps_done"] = -5; }),
                          "steps_done is -5, below 0");
  target.require_rejected(edit_state(saved.bytes, [](auto& s) { s["trainer"].erase("steps_done"); }),
                          "state.trainer has no field 'steps_done'");
  // The schedule refuses unsorted restarts: refused before anything changed.
  target.require_rejected(edit_state(saved.bytes, [](auto& s) { s["schedule"]["restart_steps"] = {50, 40}; }));
  // A warm-start phase the trainer would not be in after 60 steps.
  target.require_rejected(edit_state(saved.bytes, [](auto& s) { s["optimizer"]["phase"] = "base"; }),
                          "the optimizer was saved training the base weights");
}

TEST_CASE("checkpoint: a failed save leaves the previous file intact") {
  Saved saved;
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  save_checkpoint(path, *saved.trainer);
  const std::vector<std::uint8_t> previous = read_file_bytes(path);
  // A directory that does not exist: IoError naming the path.
  CHECK_THROWS_WITH_AS(save_checkpoint(dir.file("missing/ckpt.safetensors"), *saved.trainer),
                       doctest::Contains("missing/ckpt.safetensors"), IoError);
  // A save over the existing file that fails (its temporary file's name is taken by a directory).
  std::vector<float> losses;
  train(*saved.trainer, Data<float>(), saved.trainer->steps_done(), saved.trainer->steps_done() + 5, losses);
  fs::create_directory(path + ".tmp-" + std::to_string(::getpid()));
  CHECK_THROWS_AS(save_checkpoint(path, *saved.trainer), IoError);
  CHECK(read_file_bytes(path) == previous);
  Target target;
  load_checkpoint(path, *target.trainer);  // still a good checkpoint
  CHECK(target.trainer->steps_done() == 60);
}

TEST_CASE("checkpoint: CPU and CUDA write the same file, and a CPU checkpoint resumes on CUDA") {
  std::string why;
  if (!cuda_available(&why)) {
    MESSAGE("skipped: " << why);
    return;
  }
  Saved saved;
  auto cuda = make_backend<float>(Device::cuda);
  auto model = build_model<float>({}, 5, cuda);
  const Run run = relora_run();
  Trainer<float> trainer(*model, run.config, run.schedule());
  load_checkpoint_from_bytes(saved.bytes.data(), saved.bytes.size(), trainer, "cpu.ckpt");
  CHECK(serialize_checkpoint(trainer) == saved.bytes);
}

// The fuzzers' seed files were written by version 1 (6ad3727 and before: no component kinds).
// This build reads them, and what it writes from them reads back into a fresh trainer bit for bit.
TEST_CASE("checkpoint: version 1 files still load, train on, and save as version 2") {
  auto make = [] {
    struct Fixture {
      std::unique_ptr<Model<float>> model;
      std::unique_ptr<Trainer<float>> trainer;
    } f;
    auto backend = make_backend<float>(Device::cpu);
    f.model = std::make_unique<Model<float>>(backend);
    HostMatrix<float> W1(4, 3), W2(2, 4);
    for (Index i = 0; i < W1.size(); ++i) W1.data()[i] = 0.1f * float(i % 5) - 0.2f;
    for (Index i = 0; i < W2.size(); ++i) W2.data()[i] = 0.05f * float(i % 3) - 0.05f;
    f.model->add(LoraConfig{.in_features = 3, .out_features = 4, .rank = 2, .alpha = 4, .dropout = 0.25,
                            .bias = BiasMode::trainable, .seed = 1},
                 Activation::relu, W1, "0");
    f.model->add(LoraConfig{.in_features = 4, .out_features = 2, .rank = 1, .alpha = 1, .rslora = true, .seed = 2},
                 Activation::identity, W2, "2");
    TrainerConfig config{.method = TrainingMethod::relora,
                         .adam = {.lr = 1e-2},
                         .relora = {.restart_every = 4,
                                    .reset = OptimizerReset::random_prune,
                                    .prune_fraction = 0.5,
                                    .restart_warmup_steps = 2,
                                    .warm_start_steps = 2}};
    auto schedule = std::make_shared<JaggedCosineSchedule>(jagged_schedule(config.relora, 40, 1));
    f.trainer = std::make_unique<Trainer<float>>(*f.model, config, schedule);
    return f;
  };
  HostMatrix<float> x(5, 3), y(5, 2);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = float(i % 7) * 0.3f - 1.0f;
  for (Index i = 0; i < y.size(); ++i) y.data()[i] = float(i % 4) * 0.25f;
  int loaded = 0;
  for (const auto& entry : std::filesystem::directory_iterator(RELORA_CHECKPOINT_CORPUS)) {
    CAPTURE(entry.path().string());
    const std::vector<std::uint8_t> bytes = read_file_bytes(entry.path().string());
    const SafetensorsFile file = SafetensorsFile::parse(bytes.data(), bytes.size());
    REQUIRE(file.metadata_value("version") == std::string("1"));
    auto first = make();
    load_checkpoint_from_bytes(bytes.data(), bytes.size(), *first.trainer, entry.path().string());
    Tensor<float> X = to_backend<float>(first.model->backend(), x, "X"), Y = to_backend<float>(first.model->backend(), y, "Y");
    for (int step = 0; step < 3; ++step) first.trainer->step(X, Y);
    CHECK(std::isfinite(first.trainer->loss()));
    const std::vector<std::uint8_t> resaved = serialize_checkpoint(*first.trainer);
    auto second = make();
    load_checkpoint_from_bytes(resaved.data(), resaved.size(), *second.trainer, "resaved");
    CHECK(serialize_checkpoint(*second.trainer) == resaved);
    ++loaded;
  }
  CHECK(loaded >= 6);
}
