// A bf16 or fp16 base through files: load_base_weights keeps a BF16/F16 safetensors tensor in its
// format (no round trip through fp32) and refuses bad ones by name and shape; save_base_weights
// writes it back in that format; a training checkpoint stores it as BF16/F16 and a resumed run
// continues bit for bit (ReLoRA restarts with stochastic rounding included), adapters in F32.
#include <doctest/doctest.h>

#include <cmath>
#include <random>

#include "bf16_test_util.hpp"
#include "relora/io/checkpoint.hpp"
#include "relora/io/safetensors.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::normal_matrix;
using relora::testing::TempDir;
using relora::testing::what_of;

namespace {

std::vector<std::uint8_t> little_endian(const std::vector<std::uint16_t>& bits) {
  std::vector<std::uint8_t> bytes(bits.size() * 2);
  for (std::size_t i = 0; i < bits.size(); ++i) {
    bytes[2 * i] = std::uint8_t(bits[i] & 0xFF);
    bytes[2 * i + 1] = std::uint8_t(bits[i] >> 8);
  }
  return bytes;
}

// Random finite 16-bit values of `format`, as a d x k matrix's bits.
std::vector<std::uint16_t> random_bits(Index count, BasePrecision format, std::mt19937_64& gen) {
  std::normal_distribution<float> normal(0, 0.5f);
  std::vector<std::uint16_t> bits(static_cast<std::size_t>(count));
  for (auto& b : bits) b = half_bits::round_float(normal(gen), format, HalfRounding::nearest, 0);
  return bits;
}

double rel_error(const HostMatrix<float>& a, const HostMatrix<float>& b) {
  return double((a - b).norm()) / std::max(double(b.norm()), 1e-30);
}

std::unique_ptr<Model<float>> model_of(BasePrecision precision, BaseMerge merge = BaseMerge::stochastic) {
  auto model = std::make_unique<Model<float>>(make_backend<float>(Device::cpu));
  model->add(LoraConfig{.in_features = 12, .out_features = 16, .rank = 3, .bias = BiasMode::frozen, .seed = 1,
                        .base_precision = precision, .base_merge = merge},
             Activation::relu, "0");
  model->add(LoraConfig{.in_features = 16, .out_features = 4, .rank = 2, .seed = 2, .base_precision = precision,
                        .base_merge = merge},
             Activation::identity, "1");
  return model;
}

}  // namespace

TEST_CASE("load_base_weights keeps BF16/F16 tensors in their format; save_base_weights writes them back") {
  TempDir dir;
  std::mt19937_64 gen(5);
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    const Dtype dtype = format == BasePrecision::bf16 ? Dtype::BF16 : Dtype::F16;
    const std::vector<std::uint16_t> W0 = random_bits(16 * 12, format, gen), W1 = random_bits(4 * 16, format, gen);
    const HostMatrix<float> b0 = normal_matrix<float>(16, 1, gen);
    SafetensorsWriter w;
    w.add_raw("0.weight", dtype, {16, 12}, little_endian(W0).data());
    w.add("0.bias", {16}, b0.data());
    w.add_raw("1.weight", dtype, {4, 16}, little_endian(W1).data());
    const std::string path = (dir.path() / "base.safetensors").string();
    w.write_atomically(path);

    auto model = model_of(format);
    load_base_weights(*model, path);
    CHECK(model->lora(0).base().weight_bits().bits == W0);
    CHECK(model->lora(1).base().weight_bits().bits == W1);
    const std::string out = (dir.path() / "saved.safetensors").string();
    save_base_weights(*model, out);
    const SafetensorsFile saved = SafetensorsFile::read(out);
    CHECK(saved.dtype("0.weight") == dtype);
    CHECK(std::memcmp(saved.raw_data("1.weight"), little_endian(W1).data(), W1.size() * 2) == 0);

    // A DoRA model keeps the bits too, and takes m from the 16-bit W as PEFT would.
    auto dora = std::make_unique<Model<float>>(make_backend<float>(Device::cpu));
    dora->add(std::make_unique<DoraLinear<float>>(
                  dora->backend(), DoraConfig{.lora = {.in_features = 12, .out_features = 16, .rank = 3,
                                                       .bias = BiasMode::frozen, .base_precision = format}}),
              Activation::relu, "0");
    dora->add(std::make_unique<DoraLinear<float>>(
                  dora->backend(), DoraConfig{.lora = {.in_features = 16, .out_features = 4, .rank = 2,
                                                       .base_precision = format}}),
              Activation::identity, "1");
    load_base_weights(*dora, path);
    const auto& dora0 = dynamic_cast<const DoraLinear<float>&>(dora->layer(0));
    CHECK(dora0.base().weight_bits().bits == W0);
    const HostMatrix<float> norms =
        dora0.base().weight_host().cast<double>().rowwise().norm().transpose().cast<float>();
    CHECK(rel_error(to_host(dora->backend(), dora0.m()), norms) <= 1e-6);

    // An fp32 model reads the same file exactly (every 16-bit value is a float).
    auto fp32 = model_of(BasePrecision::fp32);
    load_base_weights(*fp32, path);
    const HostMatrix<float> W0_float = to_host(fp32->backend(), fp32->lora(0).W());
    CHECK(W0_float(3, 4) == half_bits::half_to_float(W0[3 * 12 + 4], format));

    // The other 16-bit format, or F32: converted, then rounded to nearest into the layer's format.
    auto other = model_of(format == BasePrecision::bf16 ? BasePrecision::fp16 : BasePrecision::bf16);
    load_base_weights(*other, path);
    CHECK(other->lora(0).base().weight_host()(3, 4) ==
          doctest::Approx(W0_float(3, 4)).epsilon(half_unit_roundoff(other->lora(0).base().precision())));
  }
}

TEST_CASE("load_base_weights refuses a BF16 tensor of the wrong shape, or holding NaN, naming both") {
  TempDir dir;
  std::mt19937_64 gen(6);
  auto model = model_of(BasePrecision::bf16);
  const auto before = model->lora(0).base().weight_bits().bits;
  const HostMatrix<float> b0 = normal_matrix<float>(16, 1, gen);
  const auto write = [&](const std::vector<std::int64_t>& shape, std::vector<std::uint16_t> bits) {
    SafetensorsWriter w;
    w.add_raw("0.weight", Dtype::BF16, shape, little_endian(bits).data());
    w.add("0.bias", {16}, b0.data());
    const std::vector<std::uint16_t> W1 = random_bits(4 * 16, BasePrecision::bf16, gen);
    w.add_raw("1.weight", Dtype::BF16, {4, 16}, little_endian(W1).data());
    const std::string path = (dir.path() / "bad.safetensors").string();
    w.write_atomically(path);
    return path;
  };
  const std::string shape_message =
      what_of([&] { load_base_weights(*model, write({16, 11}, random_bits(16 * 11, BasePrecision::bf16, gen))); });
  MESSAGE(shape_message);
  CHECK(shape_message.find("tensor '0.weight' has shape [16 x 11], layer '0' (12 -> 16) needs [16 x 12]") !=
        std::string::npos);
  std::vector<std::uint16_t> nan = random_bits(16 * 12, BasePrecision::bf16, gen);
  nan[5] = 0x7FC0;
  const std::string nan_message = what_of([&] { load_base_weights(*model, write({16, 12}, nan)); });
  MESSAGE(nan_message);
  CHECK(nan_message.find("tensor '0.weight' [16 x 12] holds NaN or Inf at (0, 5)") != std::string::npos);
  CHECK(model->lora(0).base().weight_bits().bits == before);
}

TEST_CASE("a checkpoint of a bf16 ReLoRA run stores W as BF16 and resumes bit for bit") {
  TempDir dir;
  for (const BaseMerge merge : {BaseMerge::stochastic, BaseMerge::fp32_master}) {
    CAPTURE(std::string(base_merge_name(merge)));
    std::mt19937_64 gen(12);
    const HostMatrix<float> x = normal_matrix<float>(20, 12, gen), y = normal_matrix<float>(20, 4, gen);
    const TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-2},
                               .relora = {.restart_every = 4}};
    auto straight = model_of(BasePrecision::bf16, merge);
    Trainer<float> straight_trainer(*straight, config);
    Tensor<float> X = to_backend<float>(straight->backend(), x, "X");
    Tensor<float> Y = to_backend<float>(straight->backend(), y, "Y");
    std::vector<float> losses;
    const std::string path = (dir.path() / "run.ckpt").string();
    for (int step = 0; step < 15; ++step) {
      straight_trainer.step(X, Y);
      losses.push_back(straight_trainer.loss());
      if (step == 6) save_checkpoint(path, straight_trainer);  // between restarts 1 (step 4) and 2 (step 8)
    }
    const SafetensorsFile file = SafetensorsFile::read(path);
    int half_tensors = 0;
    for (const std::string& name : file.names()) {
      if (file.dtype(name) == Dtype::BF16) ++half_tensors;
      if (name.find("lora_A") != std::string::npos) CHECK(file.dtype(name) == Dtype::F32);
    }
    CHECK(half_tensors == 3);  // two weights and the frozen bias

    auto resumed = model_of(BasePrecision::bf16, merge);
    Trainer<float> resumed_trainer(*resumed, config);
    load_checkpoint(path, resumed_trainer);
    for (int step = 7; step < 15; ++step) {
      resumed_trainer.step(X, Y);
      CHECK(resumed_trainer.loss() == losses[std::size_t(step)]);
    }
    for (std::size_t i = 0; i < 2; ++i) {
      CHECK(resumed->lora(i).base().weight_bits().bits == straight->lora(i).base().weight_bits().bits);
      CHECK(resumed->lora(i).base().rounding_stream() == straight->lora(i).base().rounding_stream());
    }
    if (merge == BaseMerge::stochastic) CHECK(straight->lora(0).base().rounding_stream() == 3);

    // An fp32 model refuses the checkpoint, naming the field.
    auto fp32 = model_of(BasePrecision::fp32);
    Trainer<float> fp32_trainer(*fp32, config);
    const std::string message = what_of([&] { load_checkpoint(path, fp32_trainer); });
    MESSAGE(message);
    CHECK(message.find("base_precision") != std::string::npos);
  }
}
