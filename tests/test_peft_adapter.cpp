// PEFT adapters and base weights: export then import is bit exact, the JSON carries PEFT's fields,
// and every missing key, shape or config mismatch is refused with a message naming it, changing
// nothing. (scripts/run_peft_check.sh proves the files against PyTorch + PEFT themselves.)
#include <doctest/doctest.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

#include "relora/io/atomic_file.hpp"
#include "relora/layers/dora_linear.hpp"
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

// Every layer's W, b, A, B (and a DoRA layer's m) on the host, to show that a refused import
// changed nothing.
std::vector<HostMatrix<float>> snapshot(Model<float>& model) {
  std::vector<HostMatrix<float>> all;
  for (std::size_t i = 0; i < model.size(); ++i) {
    if (const auto* d = dynamic_cast<const DoraLinear<float>*>(&model.layer(i))) {
      for (const Tensor<float>* t : {&d->W(), &d->A(), &d->B(), &d->m()}) all.push_back(to_host(model.backend(), *t));
      if (d->has_bias()) all.push_back(to_host(model.backend(), d->b()));
      continue;
    }
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

// An edit of a good adapter's weights file, and two common ones.
using WeightsEdit = std::function<void(SafetensorsWriter&, const SafetensorsFile&)>;

// Every tensor of the good file but `name`.
WeightsEdit without_tensor(const std::string& name) {
  return [name](SafetensorsWriter& w, const SafetensorsFile& f) {
    for (const auto& n : f.names()) {
      if (n != name) w.add_raw(n, f.dtype(n), f.shape(n), f.raw_data(n));
    }
  };
}

// Every tensor of the good file, `name` declared with `shape` (same bytes).
WeightsEdit with_shape(const std::string& name, std::vector<std::int64_t> shape) {
  return [name, shape](SafetensorsWriter& w, const SafetensorsFile& f) {
    for (const auto& n : f.names()) w.add_raw(n, f.dtype(n), n == name ? shape : f.shape(n), f.raw_data(n));
  };
}

// Writes the edited weights into `dir` (adapter_model.safetensors), requires the import to be
// refused with `expected`, then puts the good weights back.
void require_weights_refused(Model<float>& model, const std::string& dir, const std::vector<std::uint8_t>& good_weights,
                             const WeightsEdit& edit, const std::string& expected) {
  const SafetensorsFile file = SafetensorsFile::parse(good_weights);
  SafetensorsWriter writer;
  edit(writer, file);
  const std::string path = (fs::path(dir) / "adapter_model.safetensors").string();
  writer.write_atomically(path);
  require_import_refused(model, dir, expected);
  write_file_atomically(path, good_weights);
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

  const auto with_weights = [&](const WeightsEdit& edit, const std::string& expected) {
    require_weights_refused(*target, dir.file(), good_weights, edit, expected);
  };
  with_weights(without_tensor("base_model.model.2.lora_B.weight"),
               "tensor 'base_model.model.2.lora_B.weight' is missing (module '2' is a target module)");
  with_weights(with_shape("base_model.model.0.lora_A.weight", {16, 4}),
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

// ---- DoRA: use_dora true, the magnitude under PEFT's key ----

namespace {

// The same MLP with DoRA layers; `dora_layers` says which of "0", "2", "4" are DoraLinear (the rest
// LoraLinear), for the mixed models.
std::unique_ptr<Model<float>> dora_mlp(const MlpSpec& s = {}, std::array<bool, 3> dora_layers = {true, true, true}) {
  auto backend = make_backend<float>(Device::cpu);
  auto model = std::make_unique<Model<float>>(backend);
  const auto cfg = [&](Index k, Index d, Index r, double alpha, std::uint64_t seed) {
    return LoraConfig{.in_features = k, .out_features = d, .rank = r, .alpha = alpha, .rslora = s.rslora,
                      .dropout = 0.05, .bias = BiasMode::frozen, .seed = seed};
  };
  const auto add = [&](bool dora, const LoraConfig& c, Activation act, const std::string& name) {
    if (dora) {
      model->add(std::make_unique<DoraLinear<float>>(*backend, DoraConfig{.lora = c}), act, name);
    } else {
      model->add(c, act, name);
    }
  };
  add(dora_layers[0], cfg(16, 32, s.rank, s.alpha, s.seed), Activation::relu, "0");
  add(dora_layers[1], cfg(32, 32, s.rank, s.alpha, s.seed + 1), Activation::relu, "2");
  add(dora_layers[2], cfg(32, 8, s.last_rank, s.last_alpha, s.seed + 2), Activation::identity, "4");
  return model;
}

DoraLinear<float>& dora(Model<float>& model, std::size_t i) { return dynamic_cast<DoraLinear<float>&>(model.layer(i)); }

// A trained DoRA adapter's state: random A, B (non-zero) and m away from the row norms of W.
void randomize_dora(Model<float>& model, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  for (std::size_t i = 0; i < model.size(); ++i) {
    DoraLinear<float>& l = dora(model, i);
    l.set_A(normal_matrix<float>(l.rank(), l.in_features(), gen, 0.3));
    l.set_B(normal_matrix<float>(l.out_features(), l.rank(), gen, 0.3));
    HostMatrix<float> m = to_host(model.backend(), l.m());
    m.array() *= 1.0f + 0.2f * normal_matrix<float>(1, l.out_features(), gen).array();
    l.set_m(m);
  }
}

}  // namespace

TEST_CASE("PEFT DoRA adapter: export then import is bit exact (A, B, m and the outputs), with and without rsLoRA") {
  for (bool rslora : {false, true}) {
    CAPTURE(rslora);
    TempDir dir;
    MlpSpec spec;
    spec.rslora = rslora;
    auto source = dora_mlp(spec);
    randomize_dora(*source, 3);
    export_peft_adapter(*source, dir.file("adapter"));
    save_base_weights(*source, dir.file("base.safetensors"));

    MlpSpec other = spec;
    other.seed = 50;
    auto target = dora_mlp(other);
    load_base_weights(*target, dir.file("base.safetensors"));
    randomize_dora(*target, 4);  // everything the import must overwrite differs
    const PeftImportResult result = import_peft_adapter(*target, dir.file("adapter"));
    CHECK(result.loaded == std::vector<std::string>{"0", "2", "4"});
    CHECK(result.zeroed.empty());
    for (std::size_t i = 0; i < source->size(); ++i) {
      CAPTURE(i);
      const DoraLinear<float>& a = dora(*source, i);
      const DoraLinear<float>& b = dora(*target, i);
      for (auto t : {&DoraLinear<float>::A, &DoraLinear<float>::B, &DoraLinear<float>::m, &DoraLinear<float>::W,
                     &DoraLinear<float>::b}) {
        CHECK(same_bits(to_host(source->backend(), (a.*t)()), to_host(target->backend(), (b.*t)())));
      }
    }
    std::mt19937_64 gen(9);
    const HostMatrix<float> X = normal_matrix<float>(5, 16, gen);
    source->set_training(false);
    target->set_training(false);
    const HostMatrix<float> y = source->predict(X);
    CHECK(same_bits(y, target->predict(X)));
    // Not vacuous: the adapter changes the output.
    auto base = dora_mlp(spec);
    load_base_weights(*base, dir.file("base.safetensors"));
    base->set_training(false);
    CHECK((y - base->predict(X)).cwiseAbs().maxCoeff() > 1e-2);
  }
}

TEST_CASE("PEFT DoRA adapter: use_dora true, the magnitude 1-D under base_model.model.<module>.lora_magnitude_vector") {
  TempDir dir;
  MlpSpec spec;
  spec.last_alpha = 3;
  auto model = dora_mlp(spec);
  randomize_dora(*model, 4);
  export_peft_adapter(*model, dir.file(), {.base_model_name_or_path = "my/base"});

  const SafetensorsFile weights = SafetensorsFile::read(dir.file("adapter_model.safetensors"));
  CHECK(weights.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  CHECK(weights.names() ==
        std::vector<std::string>{"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight",
                                 "base_model.model.0.lora_magnitude_vector", "base_model.model.2.lora_A.weight",
                                 "base_model.model.2.lora_B.weight", "base_model.model.2.lora_magnitude_vector",
                                 "base_model.model.4.lora_A.weight", "base_model.model.4.lora_B.weight",
                                 "base_model.model.4.lora_magnitude_vector"});
  CHECK(weights.shape("base_model.model.0.lora_magnitude_vector") == std::vector<std::int64_t>{32});
  CHECK(weights.shape("base_model.model.2.lora_magnitude_vector") == std::vector<std::int64_t>{32});
  CHECK(weights.shape("base_model.model.4.lora_magnitude_vector") == std::vector<std::int64_t>{8});
  CHECK(weights.dtype("base_model.model.4.lora_magnitude_vector") == Dtype::F32);
  CHECK(weights.shape("base_model.model.4.lora_A.weight") == std::vector<std::int64_t>{2, 32});
  CHECK(weights.shape("base_model.model.4.lora_B.weight") == std::vector<std::int64_t>{8, 2});
  const std::vector<float> m4 = weights.to_float("base_model.model.4.lora_magnitude_vector");
  CHECK(same_bits(Eigen::Map<const HostMatrix<float>>(m4.data(), 1, 8), to_host(model->backend(), dora(*model, 2).m())));

  const nlohmann::json config = read_json(dir.file("adapter_config.json"));
  CHECK(config["peft_type"] == "LORA");
  CHECK(config["use_dora"] == true);
  CHECK(config["r"] == 4);
  CHECK(config["lora_alpha"] == 8);
  CHECK(config["target_modules"] == nlohmann::json::array({"0", "2", "4"}));
  CHECK(config["rank_pattern"] == nlohmann::json{{"4", 2}});
  CHECK(config["alpha_pattern"] == nlohmann::json{{"4", 3}});
  CHECK(config["lora_dropout"] == 0.05);
  CHECK(config["use_rslora"] == false);
  CHECK(config["bias"] == "none");
  CHECK(config["lora_bias"] == false);  // PEFT refuses lora_bias with DoRA
  CHECK(config["fan_in_fan_out"] == false);
  CHECK(config["base_model_name_or_path"] == "my/base");
}

TEST_CASE("PEFT DoRA adapter: LoRA and DoRA files are refused by layers of the other kind, naming the module") {
  TempDir lora_dir, dora_dir;
  auto lora_model = mlp();
  randomize_adapters(*lora_model, 7);
  export_peft_adapter(*lora_model, lora_dir.file());
  auto dora_model = dora_mlp();
  randomize_dora(*dora_model, 8);
  export_peft_adapter(*dora_model, dora_dir.file());

  auto lora_target = mlp();
  require_import_refused(*lora_target, dora_dir.file(),
                         "use_dora is true but module '0' is a LoRA layer (kind \"lora\"): build the layer as DoraLinear");
  auto dora_target = dora_mlp();
  require_import_refused(*dora_target, lora_dir.file(),
                         "use_dora is false but module '0' is a DoRA layer (kind \"dora\"): build the layer as LoraLinear");
  // A mixed model: the first layer of the other kind is named.
  auto mixed = dora_mlp({}, {true, false, true});
  require_import_refused(*mixed, dora_dir.file(), "use_dora is true but module '2' is a LoRA layer");

  const nlohmann::json good = read_json(dora_dir.file("adapter_config.json"));
  const std::vector<std::uint8_t> good_weights = read_file_bytes(dora_dir.file("adapter_model.safetensors"));
  const auto with_config = [&](const std::function<void(nlohmann::json&)>& edit, const std::string& expected) {
    nlohmann::json c = good;
    edit(c);
    write_json(dora_dir.file("adapter_config.json"), c);
    require_import_refused(*dora_target, dora_dir.file(), expected);
    write_json(dora_dir.file("adapter_config.json"), good);
  };
  with_config([](auto& c) { c["use_dora"] = "yes"; }, "use_dora is \"yes\", expected true or false");
  // A LoRA config beside DoRA weights: the magnitudes are named, not silently dropped.
  {
    auto lora_target2 = mlp();
    nlohmann::json c = good;
    c["use_dora"] = false;
    write_json(dora_dir.file("adapter_config.json"), c);
    require_import_refused(*lora_target2, dora_dir.file(),
                           "tensor 'base_model.model.0.lora_magnitude_vector' is a DoRA magnitude, but");
    write_json(dora_dir.file("adapter_config.json"), good);
  }
  const auto with_weights = [&](const WeightsEdit& edit, const std::string& expected) {
    require_weights_refused(*dora_target, dora_dir.file(), good_weights, edit, expected);
  };
  with_weights(without_tensor("base_model.model.2.lora_magnitude_vector"),
               "tensor 'base_model.model.2.lora_magnitude_vector' (the DoRA magnitude of module '2') is missing");
  with_weights(with_shape("base_model.model.4.lora_magnitude_vector", {1, 8}),
               "tensor 'base_model.model.4.lora_magnitude_vector' has shape [1 x 8], module '4' needs [8]");
  with_weights(
      [](SafetensorsWriter& w, const SafetensorsFile& f) {
        for (const auto& n : f.names()) {
          if (n != "base_model.model.4.lora_magnitude_vector") {
            w.add_raw(n, f.dtype(n), f.shape(n), f.raw_data(n));
            continue;
          }
          std::vector<float> m = f.to_float(n);
          m[3] = std::numeric_limits<float>::quiet_NaN();
          w.add(n, f.shape(n), m.data());
        }
      },
      "tensor 'base_model.model.4.lora_magnitude_vector' holds NaN or Inf");

  // Export: one use_dora flag for the adapter, so a mixed model is refused, naming the layer.
  CHECK_THROWS_WITH_AS(export_peft_adapter(*mixed, lora_dir.file("mixed")),
                       doctest::Contains("layer '2' is a LoRA layer (kind \"lora\") but layer '0' is a DoRA layer"),
                       ConfigError);
  dora_model->merge();
  CHECK_THROWS_WITH_AS(export_peft_adapter(*dora_model, dora_dir.file("merged")), doctest::Contains("layer '0' is merged"),
                       ConfigError);
}

TEST_CASE("PEFT DoRA adapter: a mixed model imports an adapter that targets the layers of its kind") {
  TempDir dir;
  auto source = dora_mlp();
  randomize_dora(*source, 5);
  export_peft_adapter(*source, dir.file());
  // Keep modules "0" and "4", as a PEFT DoRA adapter with target_modules ["0", "4"] would be.
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

  // "2" is a LoRA layer: not targeted, so B = 0 there.
  auto mixed = dora_mlp({}, {true, false, true});
  {
    std::mt19937_64 gen(6);
    mixed->lora(1).set_B(normal_matrix<float>(32, 4, gen, 0.3));  // so that zeroing it shows
  }
  const PeftImportResult result = import_peft_adapter(*mixed, dir.file());
  CHECK(result.loaded == std::vector<std::string>{"0", "4"});
  CHECK(result.zeroed == std::vector<std::string>{"2"});
  CHECK(to_host(mixed->backend(), mixed->lora(1).B()).isZero(0));
  CHECK(same_bits(to_host(mixed->backend(), dora(*mixed, 0).m()), to_host(source->backend(), dora(*source, 0).m())));
  CHECK(same_bits(to_host(mixed->backend(), dora(*mixed, 2).m()), to_host(source->backend(), dora(*source, 2).m())));

  // An untargeted DoRA layer is reset to its base output: B = 0 and m = the row norms of W, g = 1.
  auto all_dora = dora_mlp();
  randomize_dora(*all_dora, 7);
  CHECK(import_peft_adapter(*all_dora, dir.file()).zeroed == std::vector<std::string>{"2"});
  DoraLinear<float>& middle = dora(*all_dora, 1);
  CHECK(to_host(all_dora->backend(), middle.B()).isZero(0));
  const HostMatrix<float> W = to_host(all_dora->backend(), middle.W());
  const HostMatrix<float> m = to_host(all_dora->backend(), middle.m());
  for (Index i = 0; i < W.rows(); ++i) CHECK(m(0, i) == doctest::Approx(W.row(i).norm()).epsilon(1e-6));
}

TEST_CASE("load_base_weights / save_base_weights: DoRA layers, m re-initialised from the loaded W") {
  TempDir dir;
  auto source = dora_mlp();
  save_base_weights(*source, dir.file("base.safetensors"));
  MlpSpec other;
  other.seed = 40;
  auto target = dora_mlp(other);
  load_base_weights(*target, dir.file("base.safetensors"));
  std::mt19937_64 gen(3);
  const HostMatrix<float> X = normal_matrix<float>(6, 16, gen);
  source->set_training(false);
  target->set_training(false);
  // Fresh layers (B = 0, g = 1) on the same W and b: the base model's output, to rounding.
  const HostMatrix<float> a = source->predict(X), b = target->predict(X);
  CHECK((a - b).cwiseAbs().maxCoeff() <= 1e-5f * a.cwiseAbs().maxCoeff());
  for (std::size_t i = 0; i < source->size(); ++i) {
    CHECK(same_bits(to_host(source->backend(), dora(*source, i).W()), to_host(target->backend(), dora(*target, i).W())));
  }
}
