// PEFT adapters and base weights: export then import is bit exact, the JSON carries PEFT's fields,
// and every missing key, shape or config mismatch is refused with a message naming it, changing
// nothing. (scripts/run_peft_check.sh proves the files against PyTorch + PEFT themselves.)
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "relora/io/atomic_file.hpp"
#include "relora/relora.hpp"
#include "test_support.hpp"
#include "relora/io/safetensors.hpp"
#include "test_data.hpp"

using namespace relora;
using relora::testing::normal_matrix;
namespace fs = std::filesystem;
using relora::testing::TempDir;

namespace {

struct MlpSpec {
  Index rank = 4;
  double alpha = 8;
  bool rslora = false;
  Index last_rank = 2;  // the head's rank differs: rank_pattern
  double last_alpha = 8;
  std::uint64_t seed = 1;
};

// nn.Sequential(Linear(16, 32), ReLU, Linear(32, 32), ReLU, Linear(32, 8)): modules "0", "2", "4".
std::unique_ptr<Model<float>> mlp(const MlpSpec& s = {}) {
  auto model = std::make_unique<Model<float>>(make_backend<float>(Device::cpu));
  const auto cfg = [&](Index k, Index d, Index r, double alpha, std::uint64_t seed) {
    return LoraConfig{.in_features = k, .out_features = d, .rank = r, .alpha = alpha, .rslora = s.rslora,
                      .dropout = 0.05, .bias = BiasMode::frozen, .seed = seed};
  };
  model->add(cfg(16, 32, s.rank, s.alpha, s.seed), Activation::relu, "0");
  model->add(cfg(32, 32, s.rank, s.alpha, s.seed + 1), Activation::relu, "2");
  model->add(cfg(32, 8, s.last_rank, s.last_alpha, s.seed + 2), Activation::identity, "4");
  return model;
}

// Gives every B non-zero values (a trained adapter) by setting random ones.
void randomize_adapters(Model<float>& model, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  for (std::size_t i = 0; i < model.size(); ++i) {
    LoraLinear<float>& layer = model.lora(i);
    layer.set_A(normal_matrix<float>(layer.rank(), layer.in_features(), gen, 0.3));
    layer.set_B(normal_matrix<float>(layer.out_features(), layer.rank(), gen, 0.3));
  }
}

bool same_bits(const HostMatrix<float>& a, const HostMatrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

// Every layer's W, b, A, B on the host, to show that a refused import changed nothing.
std::vector<HostMatrix<float>> snapshot(Model<float>& model) {
  std::vector<HostMatrix<float>> all;
  for (std::size_t i = 0; i < model.size(); ++i) {
    const LoraLinear<float>& l = model.lora(i);
    for (const Tensor<float>* t : {&l.W(), &l.A(), &l.B()}) all.push_back(to_host(model.backend(), *t));
    if (l.has_bias()) all.push_back(to_host(model.backend(), l.b()));
  }
  return all;
}

bool same_snapshot(const std::vector<HostMatrix<float>>& a, const std::vector<HostMatrix<float>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!same_bits(a[i], b[i])) return false;
  }
  return true;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

void write_json(const std::string& path, const nlohmann::json& j) {
  std::ofstream out(path);
  out << j.dump(2);
}

// Import must throw an exception whose message contains `expected`, leaving the model untouched.
void require_import_refused(Model<float>& model, const std::string& dir, const std::string& expected) {
  const auto before = snapshot(model);
  std::string message;
  try {
    import_peft_adapter(model, dir);
  } catch (const Error& e) {
    message = e.what();
  }
  INFO("message: " << message);
  REQUIRE_FALSE(message.empty());
  CHECK(message.find(expected) != std::string::npos);
  CHECK(same_snapshot(before, snapshot(model)));
}

}  // namespace

TEST_CASE("PEFT adapter: export then import is bit exact, with and without rsLoRA") {
  for (bool rslora : {false, true}) {
    CAPTURE(rslora);
    TempDir dir;
    MlpSpec spec;
    spec.rslora = rslora;
    auto source = mlp(spec);
    randomize_adapters(*source, 3);
    export_peft_adapter(*source, dir.file("adapter"), {.base_model_name_or_path = "mlp-16-32-32-8"});
    save_base_weights(*source, dir.file("base.safetensors"));

    MlpSpec other = spec;
    other.seed = 50;  // other base weights and other adapters to start from
    auto target = mlp(other);
    load_base_weights(*target, dir.file("base.safetensors"));
    const PeftImportResult result = import_peft_adapter(*target, dir.file("adapter"));
    CHECK(result.loaded == std::vector<std::string>{"0", "2", "4"});
    CHECK(result.zeroed.empty());
    for (std::size_t i = 0; i < source->size(); ++i) {
      CAPTURE(i);
      const LoraLinear<float>& a = source->lora(i);
      const LoraLinear<float>& b = target->lora(i);
      CHECK(same_bits(to_host(source->backend(), a.A()), to_host(target->backend(), b.A())));
      CHECK(same_bits(to_host(source->backend(), a.B()), to_host(target->backend(), b.B())));
      CHECK(same_bits(to_host(source->backend(), a.W()), to_host(target->backend(), b.W())));
      CHECK(same_bits(to_host(source->backend(), a.b()), to_host(target->backend(), b.b())));
    }
    std::mt19937_64 gen(9);
    const HostMatrix<float> X = normal_matrix<float>(5, 16, gen);
    source->set_training(false);
    target->set_training(false);
    CHECK(same_bits(source->predict(X), target->predict(X)));
  }
}

TEST_CASE("PEFT adapter: the files carry PEFT's keys, shapes, dtype and config fields") {
  TempDir dir;
  MlpSpec spec;
  spec.last_alpha = 3;
  auto model = mlp(spec);
  randomize_adapters(*model, 4);
  export_peft_adapter(*model, dir.file(), {.base_model_name_or_path = "my/base"});

  const SafetensorsFile weights = SafetensorsFile::read(dir.file("adapter_model.safetensors"));
  CHECK(weights.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  CHECK(weights.names() == std::vector<std::string>{"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight",
                                                    "base_model.model.2.lora_A.weight", "base_model.model.2.lora_B.weight",
                                                    "base_model.model.4.lora_A.weight", "base_model.model.4.lora_B.weight"});
  CHECK(weights.shape("base_model.model.0.lora_A.weight") == std::vector<std::int64_t>{4, 16});
  CHECK(weights.shape("base_model.model.0.lora_B.weight") == std::vector<std::int64_t>{32, 4});
  CHECK(weights.shape("base_model.model.4.lora_A.weight") == std::vector<std::int64_t>{2, 32});
  CHECK(weights.shape("base_model.model.4.lora_B.weight") == std::vector<std::int64_t>{8, 2});
  CHECK(weights.dtype("base_model.model.2.lora_B.weight") == Dtype::F32);

  const nlohmann::json config = read_json(dir.file("adapter_config.json"));
  CHECK(config["peft_type"] == "LORA");
  CHECK(config["r"] == 4);
  CHECK(config["lora_alpha"] == 8);
  CHECK(config["lora_alpha"].is_number_integer());
  CHECK(config["target_modules"] == nlohmann::json::array({"0", "2", "4"}));
  CHECK(config["lora_dropout"] == 0.05);
  CHECK(config["use_rslora"] == false);
  CHECK(config["bias"] == "none");
  CHECK(config["base_model_name_or_path"] == "my/base");
  CHECK(config["task_type"].is_null());
  CHECK(config["rank_pattern"] == nlohmann::json{{"4", 2}});
  CHECK(config["alpha_pattern"] == nlohmann::json{{"4", 3}});
  CHECK(config["fan_in_fan_out"] == false);
  CHECK(config["use_dora"] == false);
  CHECK(config["lora_bias"] == false);
  CHECK(config["inference_mode"] == true);
  CHECK(config["init_lora_weights"] == true);
  CHECK_FALSE(config.contains("runtime_config"));  // PEFT warns about and drops it

  // No base model name: null, as PEFT writes it.
  TempDir other;
  export_peft_adapter(*model, other.file("a/b"));  // nested directories are created
  CHECK(read_json(other.file("a/b/adapter_config.json"))["base_model_name_or_path"].is_null());
}

TEST_CASE("PEFT adapter: rsLoRA and plain LoRA scale as PEFT does (alpha / sqrt(r) vs alpha / r)") {
  CHECK(lora_scale(LoraConfig{.in_features = 4, .out_features = 4, .rank = 4, .alpha = 8}) == 2.0);
  CHECK(lora_scale(LoraConfig{.in_features = 4, .out_features = 4, .rank = 4, .alpha = 8, .rslora = true}) == 4.0);
}

TEST_CASE("PEFT adapter: an adapter that targets some layers leaves the others without a LoRA branch") {
  TempDir dir;
  auto source = mlp();
  randomize_adapters(*source, 5);
  export_peft_adapter(*source, dir.file());
  // Drop module "2" from the adapter, as a PEFT adapter with target_modules ["0", "4"] would be.
  nlohmann::json config = read_json(dir.file("adapter_config.json"));
  config["target_modules"] = {"0", "4"};
  write_json(dir.file("adapter_config.json"), config);
  const SafetensorsFile weights = SafetensorsFile::read(dir.file("adapter_model.safetensors"));
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (const std::string& n : weights.names()) {
    if (n.find(".2.") == std::string::npos) writer.add_raw(n, weights.dtype(n), weights.shape(n), weights.raw_data(n));
  }
  writer.write_atomically(dir.file("adapter_model.safetensors"));

  auto target = mlp();
  randomize_adapters(*target, 6);
  const PeftImportResult result = import_peft_adapter(*target, dir.file());
  CHECK(result.loaded == std::vector<std::string>{"0", "4"});
  CHECK(result.zeroed == std::vector<std::string>{"2"});
  CHECK(to_host(target->backend(), target->lora(1).B()).isZero(0));

  // A regular expression as target_modules, as PEFT allows.
  config["target_modules"] = "(0|4)";
  write_json(dir.file("adapter_config.json"), config);
  CHECK(import_peft_adapter(*target, dir.file()).loaded == std::vector<std::string>{"0", "4"});
}

TEST_CASE("PEFT adapter: mismatched configs, missing keys and wrong shapes are refused, naming them") {
  TempDir dir;
  auto source = mlp();
  randomize_adapters(*source, 7);
  export_peft_adapter(*source, dir.file());
  const nlohmann::json good = read_json(dir.file("adapter_config.json"));
  const std::vector<std::uint8_t> good_weights = read_file_bytes(dir.file("adapter_model.safetensors"));
  auto target = mlp();

  {
    MlpSpec s;
    s.rank = 8;
    auto wide = mlp(s);
    require_import_refused(*wide, dir.file(),
                           "module '0': the adapter has r = 4, alpha = 8.0, rslora = false, scale = 2.0 but the layer "
                           "was built with r = 8, alpha = 8.0, rslora = false, scale = 1.0 (r differs)");
  }
  {
    MlpSpec s;
    s.alpha = 16;
    auto other = mlp(s);
    require_import_refused(*other, dir.file(), "(lora_alpha differs). A layer's rank, alpha and rsLoRA flag are fixed");
  }
  {
    MlpSpec s;
    s.rslora = true;
    auto other = mlp(s);
    require_import_refused(*other, dir.file(), "(use_rslora differs)");
  }
  const auto with_config = [&](const std::function<void(nlohmann::json&)>& edit, const std::string& expected) {
    nlohmann::json c = good;
    edit(c);
    write_json(dir.file("adapter_config.json"), c);
    require_import_refused(*target, dir.file(), expected);
    write_json(dir.file("adapter_config.json"), good);
  };
  with_config([](auto& c) { c["peft_type"] = "IA3"; }, "peft_type is \"IA3\", relora reads \"LORA\" adapters");
  with_config([](auto& c) { c.erase("r"); }, "r is missing");
  with_config([](auto& c) { c["lora_alpha"] = "8"; }, "lora_alpha is \"8\", expected a number");
  with_config([](auto& c) { c["use_dora"] = true; }, "use_dora is true");
  with_config([](auto& c) { c["bias"] = "all"; }, "bias is \"all\"");
  with_config([](auto& c) { c["fan_in_fan_out"] = true; }, "fan_in_fan_out is true");
  with_config([](auto& c) { c.erase("target_modules"); }, "target_modules is missing");
  with_config([](auto& c) { c["rank_pattern"] = nlohmann::json::object(); }, "module '4': the adapter has r = 4");
  with_config([](auto& c) { c["target_modules"] = {"0", "2"}; },
              "tensor 'base_model.model.4.lora_A.weight' belongs to no target module");

  const auto with_weights = [&](const std::function<void(SafetensorsWriter&, const SafetensorsFile&)>& edit,
                                const std::string& expected) {
    const SafetensorsFile file = SafetensorsFile::parse(good_weights);
    SafetensorsWriter writer;
    edit(writer, file);
    writer.write_atomically(dir.file("adapter_model.safetensors"));
    require_import_refused(*target, dir.file(), expected);
    write_file_atomically(dir.file("adapter_model.safetensors"), good_weights);
  };
  with_weights(
      [](SafetensorsWriter& w, const SafetensorsFile& f) {
        for (const auto& n : f.names()) {
          if (n != "base_model.model.2.lora_B.weight") w.add_raw(n, f.dtype(n), f.shape(n), f.raw_data(n));
        }
      },
      "tensor 'base_model.model.2.lora_B.weight' is missing (module '2' is a target module)");
  with_weights(
      [](SafetensorsWriter& w, const SafetensorsFile& f) {
        for (const auto& n : f.names()) {
          const bool bad = n == "base_model.model.0.lora_A.weight";
          w.add_raw(n, f.dtype(n), bad ? std::vector<std::int64_t>{16, 4} : f.shape(n), f.raw_data(n));
        }
      },
      "tensor 'base_model.model.0.lora_A.weight' has shape [16 x 4], module '0' needs [4 x 16]");
  with_weights(
      [](SafetensorsWriter& w, const SafetensorsFile& f) {
        for (const auto& n : f.names()) w.add_raw(n, f.dtype(n), f.shape(n), f.raw_data(n));
        const float x = 1;
        w.add("base_model.model.9.lora_A.weight", {1, 1}, &x);
      },
      "tensor 'base_model.model.9.lora_A.weight' belongs to no target module of this model (its layers: '0', '2', '4')");
  fs::remove(dir.file("adapter_model.safetensors"));
  require_import_refused(*target, dir.file(), "adapter_model.safetensors");
  fs::remove(dir.file("adapter_config.json"));
  require_import_refused(*target, dir.file(), "adapter_config.json");

  // A merged model: its adapter is already in W.
  source->merge();
  CHECK_THROWS_WITH_AS(export_peft_adapter(*source, dir.file()), doctest::Contains("layer '0' is merged"), ConfigError);
}

TEST_CASE("load_base_weights: a PyTorch state_dict by module name; missing or mismatched tensors refused") {
  TempDir dir;
  std::mt19937_64 gen(11);
  const HostMatrix<float> W0 = normal_matrix<float>(32, 16, gen), W2 = normal_matrix<float>(32, 32, gen),
                          W4 = normal_matrix<float>(8, 32, gen);
  const HostMatrix<float> b0 = normal_matrix<float>(32, 1, gen), b2 = normal_matrix<float>(32, 1, gen),
                          b4 = normal_matrix<float>(8, 1, gen);
  const auto write = [&](const std::string& path, const std::string& prefix, bool with_head_bias, Index head_in) {
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    w.add(prefix + "0.weight", {32, 16}, W0.data());
    w.add(prefix + "0.bias", {32}, b0.data());
    w.add(prefix + "2.weight", {32, 32}, W2.data());
    w.add(prefix + "2.bias", {32}, b2.data());
    const HostMatrix<float> head = normal_matrix<float>(8, head_in, gen);
    w.add(prefix + "4.weight", {8, head_in}, head_in == 32 ? W4.data() : head.data());
    if (with_head_bias) w.add(prefix + "4.bias", {8}, b4.data());
    w.add(prefix + "unrelated.running_mean", {3}, b4.data());  // ignored
    w.write_atomically(path);
  };
  write(dir.file("sd.safetensors"), "", true, 32);
  write(dir.file("prefixed.safetensors"), "model.", true, 32);
  write(dir.file("no_bias.safetensors"), "", false, 32);
  write(dir.file("narrow.safetensors"), "", true, 30);

  auto model = mlp();
  load_base_weights(*model, dir.file("sd.safetensors"));
  CHECK(same_bits(to_host(model->backend(), model->lora(0).W()), W0));
  CHECK(same_bits(to_host(model->backend(), model->lora(2).W()), W4));
  CHECK(same_bits(to_host(model->backend(), model->lora(1).b()), HostMatrix<float>(b2.transpose())));
  auto prefixed = mlp();
  load_base_weights(*prefixed, dir.file("prefixed.safetensors"), "model.");
  CHECK(same_snapshot(snapshot(*model), snapshot(*prefixed)));

  auto fresh = mlp();
  const auto before = snapshot(*fresh);
  CHECK_THROWS_WITH_AS(load_base_weights(*fresh, dir.file("no_bias.safetensors")),
                       doctest::Contains("tensor '4.bias' is missing, but layer '4' has a bias"), IoError);
  CHECK_THROWS_WITH_AS(load_base_weights(*fresh, dir.file("narrow.safetensors")),
                       doctest::Contains("tensor '4.weight' has shape [8 x 30], layer '4' (32 -> 8) needs [8 x 32]"),
                       IoError);
  CHECK_THROWS_WITH_AS(load_base_weights(*fresh, dir.file("sd.safetensors"), "model."),
                       doctest::Contains("tensor 'model.0.weight' (the weight of layer '0') is missing"), IoError);
  CHECK(same_snapshot(before, snapshot(*fresh)));

  // A layer built without a bias refuses the file's bias instead of dropping it.
  auto no_bias = std::make_unique<Model<float>>(make_backend<float>(Device::cpu));
  no_bias->add(LoraConfig{.in_features = 16, .out_features = 32, .rank = 2}, Activation::relu, "0");
  no_bias->add(LoraConfig{.in_features = 32, .out_features = 32, .rank = 2}, Activation::relu, "2");
  no_bias->add(LoraConfig{.in_features = 32, .out_features = 8, .rank = 2}, Activation::identity, "4");
  CHECK_THROWS_WITH_AS(load_base_weights(*no_bias, dir.file("sd.safetensors")),
                       doctest::Contains("the file has a bias '0.bias' but layer '0' was built with BiasMode::none"),
                       IoError);
}
