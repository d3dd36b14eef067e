// libFuzzer harness for load_checkpoint. Any input must either load or throw IoError, and a
// refused input must leave the trainer exactly as it was (its serialized state unchanged); a
// crash, a leak, an out-of-bounds read, undefined behaviour or any other exception is a bug.
//
// Random bytes rarely pass the checksum, so each input that parses as safetensors is tried a
// second time with its checksum recomputed: that reaches the state JSON, config and tensor checks.
//
// Seeds: RELORA_FUZZ_WRITE_SEEDS=<dir> ./fuzz_checkpoint writes valid checkpoints of the harness's
// trainer into <dir> and exits (fuzz/corpus/checkpoint holds them).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "relora/io/checkpoint.hpp"
#include "relora/io/checksum.hpp"
#include "relora/core/errors.hpp"
#include "relora/core/host_matrix.hpp"
#include "relora/io/safetensors.hpp"

namespace {

using namespace relora;

void require(bool condition) {
  if (!condition) __builtin_trap();
}

// A small ReLoRA trainer: 3 -> 4 (ReLU, trainable bias, dropout) -> 2, restarts every 4 steps
// after a 2-step warm start, with a jagged schedule.
struct Fixture {
  std::unique_ptr<Model<float>> model;
  std::unique_ptr<Trainer<float>> trainer;
  Tensor<float> X, Y;

  Fixture() {
    auto backend = make_backend<float>(Device::cpu);
    model = std::make_unique<Model<float>>(backend);
    HostMatrix<float> W1(4, 3), W2(2, 4);
    for (Index i = 0; i < W1.size(); ++i) W1.data()[i] = 0.1f * float(i % 5) - 0.2f;
    for (Index i = 0; i < W2.size(); ++i) W2.data()[i] = 0.05f * float(i % 3) - 0.05f;
    // Configs field by field: the harness compiles as C++17, without designated initialisers.
    LoraConfig first;
    first.in_features = 3, first.out_features = 4, first.rank = 2, first.alpha = 4, first.dropout = 0.25;
    first.bias = BiasMode::trainable, first.seed = 1;
    LoraConfig second;
    second.in_features = 4, second.out_features = 2, second.rank = 1, second.alpha = 1, second.rslora = true;
    second.seed = 2;
    model->add(first, Activation::relu, W1, "0");
    model->add(second, Activation::identity, W2, "2");
    TrainerConfig config;
    config.method = TrainingMethod::relora;
    config.adam.lr = 1e-2;
    config.relora.restart_every = 4;
    config.relora.reset = OptimizerReset::random_prune;
    config.relora.prune_fraction = 0.5;
    config.relora.restart_warmup_steps = 2;
    config.relora.warm_start_steps = 2;
    auto schedule = std::make_shared<JaggedCosineSchedule>(jagged_schedule(config.relora, 40, 1));
    trainer = std::make_unique<Trainer<float>>(*model, config, schedule);
    HostMatrix<float> x(5, 3), y(5, 2);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = float(i % 7) * 0.3f - 1.0f;
    for (Index i = 0; i < y.size(); ++i) y.data()[i] = float(i % 4) * 0.25f;
    X = to_backend<float>(model->backend(), x, "X");
    Y = to_backend<float>(model->backend(), y, "Y");
  }
};

void try_load(const std::uint8_t* data, std::size_t size) {
  Fixture f;
  const std::vector<std::uint8_t> before = serialize_checkpoint(*f.trainer);
  try {
    load_checkpoint_from_bytes(data, size, *f.trainer, "fuzz input");
  } catch (const IoError&) {
    require(serialize_checkpoint(*f.trainer) == before);  // refused: nothing changed
    return;
  }
  // Loaded: the trainer must train on (overflow to Inf is a refused step, not a crash) and
  // save again what it loaded.
  const std::vector<std::uint8_t> loaded = serialize_checkpoint(*f.trainer);
  Fixture again;
  load_checkpoint_from_bytes(loaded.data(), loaded.size(), *again.trainer, "fuzz reload");
  require(serialize_checkpoint(*again.trainer) == loaded);
  for (int i = 0; i < 3; ++i) {
    try {
      f.trainer->step(f.X, f.Y);
    } catch (const Error&) {  // NaN or Inf met, or a merged layer refusing to train
      break;
    }
  }
}

// The same tensors and metadata, with the checksum the loader will compute.
std::optional<std::vector<std::uint8_t>> with_valid_checksum(const std::uint8_t* data, std::size_t size) {
  std::optional<SafetensorsFile> file;
  try {
    file.emplace(SafetensorsFile::parse(data, size, "fuzz input"));
  } catch (const IoError&) {
    return std::nullopt;
  }
  const auto state = file->metadata_value("state");
  if (!state) return std::nullopt;
  SafetensorsWriter writer;
  for (const std::string& name : file->names()) {
    writer.add_raw(name, file->dtype(name), file->shape(name), file->raw_data(name));
  }
  for (const auto& [key, value] : file->metadata()) writer.set_metadata(key, value);
  writer.set_metadata("checksum", checksum_hex(0));
  const std::vector<std::uint8_t> draft = writer.serialize();
  const SafetensorsFile parsed = SafetensorsFile::parse(draft, "fuzz rewrite");
  Fnv1a64 hash;
  hash.update(draft.data() + parsed.data_start(), draft.size() - parsed.data_start());
  hash.update(state->data(), state->size());
  writer.set_metadata("checksum", checksum_hex(hash.value()));
  return writer.serialize();
}

void write_seeds(const std::string& dir) {
  Fixture f;
  for (int steps : {0, 1, 2, 3, 6, 9}) {
    while (f.trainer->steps_done() < steps) f.trainer->step(f.X, f.Y);
    const std::vector<std::uint8_t> bytes = serialize_checkpoint(*f.trainer);
    std::ofstream out(dir + "/steps_" + std::to_string(steps) + ".safetensors", std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("RELORA_FUZZ_WRITE_SEEDS")) {
    write_seeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try_load(data, size);
  if (auto fixed = with_valid_checksum(data, size)) try_load(fixed->data(), fixed->size());
  return 0;
}
