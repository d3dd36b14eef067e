#include "relora/io/peft_adapter.hpp"

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <type_traits>

#include "relora/io/atomic_file.hpp"
#include "relora/core/host_matrix.hpp"
#include "relora/io/safetensors.hpp"
#include "relora/layers/dora_linear.hpp"

namespace relora {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

constexpr const char* kAdapterWeights = "adapter_model.safetensors";
constexpr const char* kAdapterConfig = "adapter_config.json";
const std::string kPeftPrefix = "base_model.model.";

std::string join(const std::string& dir, const char* file) { return (std::filesystem::path(dir) / file).string(); }

std::string key_A(const std::string& module) { return kPeftPrefix + module + ".lora_A.weight"; }
std::string key_B(const std::string& module) { return kPeftPrefix + module + ".lora_B.weight"; }
// DoRA's magnitude m, 1-D of out_features. PEFT (0.20 and later; LoraModel._get_adapter_state_dict)
// holds it as lora_magnitude_vector.<adapter>.weight and saves it without ".<adapter>.weight", the
// pre-refactor key it keeps for compatibility; loading appends ".weight" again.
const std::string kMagnitudeSuffix = ".lora_magnitude_vector";
std::string key_m(const std::string& module) { return kPeftPrefix + module + kMagnitudeSuffix; }

// The layers these files know: LoraLinear (and its faster implementations, which derive from it)
// and DoraLinear, which is a Layer of its own. `f` is called with the layer as the one or the other
// (const where the model is); any other kind is a ConfigError naming the layer.
template <typename ModelT, typename F>
decltype(auto) visit_adapter_layer(ModelT& model, std::size_t i, const char* who, F&& f) {
  using LayerT = std::remove_reference_t<decltype(model.layer(i))>;
  constexpr bool is_const = std::is_const_v<LayerT>;
  using Lora = std::conditional_t<is_const, const LoraLinear<float>, LoraLinear<float>>;
  using Dora = std::conditional_t<is_const, const DoraLinear<float>, DoraLinear<float>>;
  LayerT& layer = model.layer(i);
  if (auto* lora = dynamic_cast<Lora*>(&layer)) return f(*lora);
  if (auto* dora = dynamic_cast<Dora*>(&layer)) return f(*dora);
  throw ConfigError(std::string(who) + ": layer '" + model.name(i) + "' is of kind \"" + layer.kind() +
                    "\"; PEFT adapters are read and written for LoRA (\"lora\") and DoRA (\"dora\") layers");
}

const LoraConfig& lora_config_of(const LoraLinear<float>& layer) { return layer.config(); }
const LoraConfig& lora_config_of(const DoraLinear<float>& layer) { return layer.lora_config(); }
constexpr bool is_dora(const LoraLinear<float>&) { return false; }
constexpr bool is_dora(const DoraLinear<float>&) { return true; }
const char* kind_text(bool dora) { return dora ? "a DoRA layer (kind \"dora\")" : "a LoRA layer (kind \"lora\")"; }

// DoRA's m as PEFT initialises it when it wraps a Linear: the row norms of V = W + s B A (computed
// in double, rounded once to float).
HostMatrix<float> magnitude_init(Backend<float>& backend, const DoraLinear<float>& layer) {
  const Eigen::MatrixXd V = layer.base().weight_host().cast<double>() +  // a 16-bit W widened
                            static_cast<double>(layer.scale()) * to_host(backend, layer.B()).cast<double>() *
                                to_host(backend, layer.A()).cast<double>();
  return V.rowwise().norm().transpose().cast<float>();
}

// A number as JSON: integral values as integers (PEFT's r and lora_alpha are ints).
json number(double x) {
  if (std::isfinite(x) && x == std::floor(x) && std::abs(x) < 9.0e15) return json(static_cast<std::int64_t>(x));
  return json(x);
}

std::string layer_text(const LoraConfig& c) {
  return "r = " + std::to_string(c.rank) + ", alpha = " + json(c.alpha).dump() +
         ", rslora = " + (c.rslora ? "true" : "false") + ", scale = " + json(lora_scale(c)).dump();
}

// PEFT's rank_pattern / alpha_pattern keys are regular expressions matched at the end of a module
// name, on a dot boundary: re.match(rf"(.*\.)?({key})$", name).
bool pattern_matches(const std::string& key, const std::string& module) {
  return std::regex_match(module, std::regex("(.*\\.)?(" + key + ")"));
}

}  // namespace

void export_peft_adapter(const Model<float>& model, const std::string& dir, const PeftExportOptions& options) {
  if (model.size() == 0) throw ConfigError("export_peft_adapter: the model has no layers");
  Backend<float>& backend = *model.backend_ptr();
  const char* const who = "export_peft_adapter";
  const LoraConfig first = visit_adapter_layer(model, 0, who, [](const auto& l) { return lora_config_of(l); });
  // PEFT's use_dora is one flag for the whole adapter (LoraConfig has no per-module pattern for it),
  // so every layer must be of the first one's kind.
  const bool dora = visit_adapter_layer(model, 0, who, [](const auto& l) { return is_dora(l); });
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  ordered_json rank_pattern = ordered_json::object(), alpha_pattern = ordered_json::object();
  json target_modules = json::array();
  for (std::size_t i = 0; i < model.size(); ++i) {
    const std::string& name = model.name(i);
    const bool layer_dora = visit_adapter_layer(model, i, who, [](const auto& l) { return is_dora(l); });
    if (layer_dora != dora) {
      throw ConfigError("export_peft_adapter: layer '" + name + "' is " + kind_text(layer_dora) + " but layer '" +
                        model.name(0) + "' is " + kind_text(dora) +
                        ": PEFT's use_dora is one flag for the whole adapter, so one adapter cannot mix them");
    }
    const LoraConfig c = visit_adapter_layer(model, i, who, [](const auto& l) { return lora_config_of(l); });
    const bool merged = visit_adapter_layer(model, i, who, [](const auto& l) { return l.merged(); });
    if (merged) {
      throw ConfigError("export_peft_adapter: layer '" + name +
                        "' is merged (its adapter is already in W); unmerge() it first, or export W with "
                        "save_base_weights and a fresh adapter");
    }
    if (c.rslora != first.rslora) {
      throw ConfigError("export_peft_adapter: layer '" + name + "' has rslora = " + (c.rslora ? "true" : "false") +
                        " but layer '" + model.name(0) + "' has " + (first.rslora ? "true" : "false") +
                        ": PEFT's use_rslora is one flag for the whole adapter");
    }
    if (c.rank != first.rank) rank_pattern[name] = c.rank;
    if (c.alpha != first.alpha) alpha_pattern[name] = number(c.alpha);
    target_modules.push_back(name);
    const HostMatrix<float> A = visit_adapter_layer(model, i, who, [&](const auto& l) { return to_host(backend, l.A()); });
    const HostMatrix<float> B = visit_adapter_layer(model, i, who, [&](const auto& l) { return to_host(backend, l.B()); });
    writer.add(key_A(name), {A.rows(), A.cols()}, A.data());
    writer.add(key_B(name), {B.rows(), B.cols()}, B.data());
    if (dora) {
      // m is 1 x d here; PEFT's parameter is 1-D, [out_features].
      const HostMatrix<float> m = to_host(backend, dynamic_cast<const DoraLinear<float>&>(model.layer(i)).m());
      writer.add(key_m(name), {c.out_features}, m.data());
    }
  }
  // LoraConfig's fields as PEFT 0.21 writes them, at its defaults where relora has no say.
  ordered_json config = ordered_json::object();
  config["peft_type"] = "LORA";
  config["task_type"] = nullptr;
  config["auto_mapping"] = nullptr;
  config["base_model_name_or_path"] =
      options.base_model_name_or_path.empty() ? ordered_json(nullptr) : ordered_json(options.base_model_name_or_path);
  config["revision"] = nullptr;
  config["inference_mode"] = true;
  config["r"] = first.rank;
  config["target_modules"] = target_modules;
  config["exclude_modules"] = nullptr;
  config["lora_alpha"] = number(first.alpha);
  config["lora_dropout"] = first.dropout;
  config["fan_in_fan_out"] = false;
  config["bias"] = "none";
  config["use_rslora"] = first.rslora;
  config["modules_to_save"] = nullptr;
  config["init_lora_weights"] = true;
  config["layers_to_transform"] = nullptr;
  config["layers_pattern"] = nullptr;
  config["rank_pattern"] = rank_pattern;
  config["alpha_pattern"] = alpha_pattern;
  config["megatron_config"] = nullptr;
  config["megatron_core"] = "megatron.core";
  config["trainable_token_indices"] = nullptr;
  config["loftq_config"] = ordered_json::object();
  config["eva_config"] = nullptr;
  config["corda_config"] = nullptr;
  config["use_dora"] = dora;
  config["alora_invocation_tokens"] = nullptr;
  config["use_qalora"] = false;
  config["qalora_group_size"] = 16;
  config["layer_replication"] = nullptr;
  config["lora_bias"] = false;
  config["target_parameters"] = nullptr;

  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) throw IoError(dir + ": cannot create the adapter directory: " + error.message());
  writer.write_atomically(join(dir, kAdapterWeights));
  const std::string text = config.dump(2) + "\n";
  write_file_atomically(join(dir, kAdapterConfig), reinterpret_cast<const std::uint8_t*>(text.data()), text.size());
}

PeftImportResult import_peft_adapter(Model<float>& model, const std::string& dir) {
  const std::string config_path = join(dir, kAdapterConfig);
  const std::string weights_path = join(dir, kAdapterWeights);
  const auto fail = [&](const std::string& what) -> void { throw IoError(config_path + ": " + what); };

  json config;
  {
    const std::vector<std::uint8_t> bytes = read_file_bytes(config_path);
    try {
      config = json::parse(bytes.begin(), bytes.end());
    } catch (const json::exception& e) {
      fail(std::string("not valid JSON: ") + e.what());
    }
  }
  if (!config.is_object()) fail("not a JSON object");
  const auto get = [&](const char* key) -> const json* {
    const auto it = config.find(key);
    return it == config.end() || it->is_null() ? nullptr : &*it;
  };
  const auto require_false = [&](const char* key, const std::string& why) {
    if (const json* v = get(key); v && !(v->is_boolean() && !v->get<bool>())) {
      fail(std::string(key) + " is " + v->dump() + ": " + why);
    }
  };
  const json* peft_type = get("peft_type");
  if (!peft_type || *peft_type != "LORA") {
    fail("peft_type is " + (peft_type ? peft_type->dump() : std::string("missing")) + ", relora reads \"LORA\" adapters");
  }
  const json* r_json = get("r");
  if (!r_json || !r_json->is_number_integer() || r_json->get<std::int64_t>() < 1) {
    fail("r is " + (r_json ? r_json->dump() : std::string("missing")) + ", expected a positive integer");
  }
  const json* alpha_json = get("lora_alpha");
  if (!alpha_json || !alpha_json->is_number()) {
    fail("lora_alpha is " + (alpha_json ? alpha_json->dump() : std::string("missing")) + ", expected a number");
  }
  bool rslora = false;
  if (const json* v = get("use_rslora")) {
    if (!v->is_boolean()) fail("use_rslora is " + v->dump() + ", expected true or false");
    rslora = v->get<bool>();
  }
  if (const json* v = get("bias"); v && *v != "none") {
    fail("bias is " + v->dump() + ": relora reads adapters with bias \"none\" (load trained biases with load_base_weights)");
  }
  bool use_dora = false;
  if (const json* v = get("use_dora")) {
    if (!v->is_boolean()) fail("use_dora is " + v->dump() + ", expected true or false");
    use_dora = v->get<bool>();
  }
  require_false("lora_bias", "relora's adapters have no bias of their own");
  require_false("fan_in_fan_out", "relora stores W as out x in, as nn.Linear does");
  if (get("layers_to_transform")) fail("layers_to_transform is set; relora reads adapters without it");

  const std::int64_t r = r_json->get<std::int64_t>();
  const double alpha = alpha_json->get<double>();
  const auto pattern = [&](const char* field, const std::string& module) -> const json* {
    const json* p = get(field);
    if (!p) return nullptr;
    if (!p->is_object()) fail(std::string(field) + " is not an object");
    for (auto it = p->begin(); it != p->end(); ++it) {
      bool match = false;
      try {
        match = pattern_matches(it.key(), module);
      } catch (const std::regex_error&) {
        fail(std::string(field) + " key '" + it.key() + "' is not a regular expression");
      }
      if (match) return &it.value();
    }
    return nullptr;
  };

  // Which layers the adapter targets: a list (exact name or a ".name" suffix, as PEFT matches) or
  // a regular expression matched against the whole module name.
  const json* targets = get("target_modules");
  if (!targets) fail("target_modules is missing");
  std::optional<std::regex> target_regex;
  std::set<std::string> target_names;
  if (targets->is_string()) {
    try {
      target_regex.emplace(targets->get<std::string>());
    } catch (const std::regex_error&) {
      fail("target_modules " + targets->dump() + " is not a regular expression");
    }
  } else if (targets->is_array()) {
    for (const json& t : *targets) {
      if (!t.is_string()) fail("target_modules holds " + t.dump() + ", not a module name");
      target_names.insert(t.get<std::string>());
    }
  } else {
    fail("target_modules is " + targets->dump() + ", expected a list of module names or a regular expression");
  }
  const auto targeted = [&](const std::string& module) {
    if (target_regex) return std::regex_match(module, *target_regex);
    for (const std::string& t : target_names) {
      if (module == t || (module.size() > t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0 &&
                          module[module.size() - t.size() - 1] == '.')) {
        return true;
      }
    }
    return false;
  };

  const SafetensorsFile file = SafetensorsFile::read(weights_path);
  const auto fail_weights = [&](const std::string& what) -> void { throw IoError(weights_path + ": " + what); };

  struct Pending {
    std::size_t layer;
    HostMatrix<float> A, B, m;  // m: DoRA's magnitude, 1 x d (empty for a LoRA layer)
  };
  std::vector<Pending> pending;
  PeftImportResult result;
  std::set<std::string> expected_keys;
  const char* const who = "import_peft_adapter";
  for (std::size_t i = 0; i < model.size(); ++i) {
    const std::string& name = model.name(i);
    const bool merged = visit_adapter_layer(model, i, who, [](const auto& l) { return l.merged(); });
    if (merged) {
      throw ConfigError("import_peft_adapter: layer '" + name + "' is merged; unmerge() it before importing an adapter");
    }
    if (!targeted(name)) {
      result.zeroed.push_back(name);
      continue;
    }
    // PEFT makes every targeted module a DoRA layer when use_dora is true and a LoRA layer when not;
    // a layer of the other kind would compute another function from the same tensors.
    const bool layer_dora = visit_adapter_layer(model, i, who, [](const auto& l) { return is_dora(l); });
    if (layer_dora != use_dora) {
      fail(std::string("use_dora is ") + (use_dora ? "true" : "false") + " but module '" + name + "' is " +
           kind_text(layer_dora) + ": build the layer as " + (use_dora ? "DoraLinear" : "LoraLinear") +
           " to import this adapter (PEFT's use_dora applies to every target module)");
    }
    const LoraConfig c = visit_adapter_layer(model, i, who, [](const auto& l) { return lora_config_of(l); });
    std::int64_t module_r = r;
    if (const json* p = pattern("rank_pattern", name)) {
      if (!p->is_number_integer() || p->get<std::int64_t>() < 1) fail("rank_pattern for '" + name + "' is " + p->dump());
      module_r = p->get<std::int64_t>();
    }
    double module_alpha = alpha;
    if (const json* p = pattern("alpha_pattern", name)) {
      if (!p->is_number()) fail("alpha_pattern for '" + name + "' is " + p->dump());
      module_alpha = p->get<double>();
    }
    if (module_r != c.rank || module_alpha != c.alpha || rslora != c.rslora) {
      LoraConfig adapter = c;
      adapter.rank = module_r, adapter.alpha = module_alpha, adapter.rslora = rslora;
      std::string what = module_r != c.rank ? "r" : module_alpha != c.alpha ? "lora_alpha" : "use_rslora";
      fail("module '" + name + "': the adapter has " + layer_text(adapter) + " but the layer was built with " +
           layer_text(c) + " (" + what + " differs). A layer's rank, alpha and rsLoRA flag are fixed when it is "
           "built: build it with the adapter's values, then import");
    }
    const auto read = [&](const std::string& key, Index rows, Index cols) {
      if (!file.contains(key)) fail_weights("tensor '" + key + "' is missing (module '" + name + "' is a target module)");
      const std::vector<std::int64_t> expected{rows, cols};
      if (file.shape(key) != expected) {
        fail_weights("tensor '" + key + "' has shape " + shape_text(file.shape(key)) + ", module '" + name +
                     "' needs " + shape_text(expected));
      }
      const std::vector<float> values = file.to_float(key);  // F32, F64, F16 or BF16; others throw
      HostMatrix<float> m = Eigen::Map<const HostMatrix<float>>(values.data(), rows, cols);
      if (!m.allFinite()) fail_weights("tensor '" + key + "' holds NaN or Inf");
      return m;
    };
    expected_keys.insert(key_A(name));
    expected_keys.insert(key_B(name));
    Pending p{i, read(key_A(name), c.rank, c.in_features), read(key_B(name), c.out_features, c.rank), {}};
    if (use_dora) {
      // 1-D [out_features], as PEFT saves it (a [1 x d] tensor would not load into PEFT either).
      const std::string key = key_m(name);
      if (!file.contains(key)) {
        fail_weights("tensor '" + key + "' (the DoRA magnitude of module '" + name + "') is missing; use_dora is true");
      }
      const std::vector<std::int64_t> expected{c.out_features};
      if (file.shape(key) != expected) {
        fail_weights("tensor '" + key + "' has shape " + shape_text(file.shape(key)) + ", module '" + name +
                     "' needs " + shape_text(expected));
      }
      const std::vector<float> values = file.to_float(key);
      p.m = Eigen::Map<const HostMatrix<float>>(values.data(), 1, c.out_features);
      if (!p.m.allFinite()) fail_weights("tensor '" + key + "' holds NaN or Inf");
      expected_keys.insert(key);
    }
    pending.push_back(std::move(p));
    result.loaded.push_back(name);
  }
  for (const std::string& key : file.names()) {
    const bool magnitude =
        key.size() > kMagnitudeSuffix.size() && key.compare(key.size() - kMagnitudeSuffix.size(), std::string::npos,
                                                            kMagnitudeSuffix) == 0;
    if (!use_dora && magnitude) {
      fail_weights("tensor '" + key + "' is a DoRA magnitude, but " + config_path +
                   " has use_dora false: the two files do not belong together");
    }
    if (expected_keys.count(key) == 0) {
      fail_weights("tensor '" + key + "' belongs to no target module of this model (its layers: " +
                   [&] {
                     std::string names;
                     for (std::size_t i = 0; i < model.size(); ++i) names += (i ? ", '" : "'") + model.name(i) + "'";
                     return names;
                   }() +
                   ")");
    }
  }

  for (const Pending& p : pending) {
    visit_adapter_layer(model, p.layer, who, [&](auto& l) {
      l.set_A(p.A);
      l.set_B(p.B);
    });
    if (p.m.size() != 0) dynamic_cast<DoraLinear<float>&>(model.layer(p.layer)).set_m(p.m);
  }
  for (std::size_t i = 0; i < model.size(); ++i) {
    for (const std::string& name : result.zeroed) {
      if (model.name(i) != name) continue;
      if (auto* dora = dynamic_cast<DoraLinear<float>*>(&model.layer(i))) {
        // B = 0 and m = the row norms of W, so that g = 1 and the layer gives W's output, as the
        // plain Linear PEFT leaves there does. reinit() sets m as the forward rounds n (g exactly 1);
        // it also re-draws A, which does not matter while B = 0.
        dora->reinit();
      } else {
        LoraLinear<float>& layer = model.lora(i);
        layer.set_B(HostMatrix<float>::Zero(layer.out_features(), layer.rank()));
      }
    }
  }
  return result;
}

void load_base_weights(Model<float>& model, const std::string& safetensors_path, const std::string& prefix) {
  const SafetensorsFile file = SafetensorsFile::read(safetensors_path);
  const auto fail = [&](const std::string& what) -> void { throw IoError(safetensors_path + ": " + what); };
  struct Pending {
    HostMatrix<float> W, b;
    bool keeps_format = false;  // a 16-bit W kept in its format (no float round trip), in W_bits
    HalfHostMatrix W_bits;
  };
  std::vector<Pending> pending;
  for (std::size_t i = 0; i < model.size(); ++i) {
    const std::string& name = model.name(i);
    const char* const who = "load_base_weights";
    const bool merged = visit_adapter_layer(model, i, who, [](const auto& l) { return l.merged(); });
    if (merged) {
      throw ConfigError("load_base_weights: layer '" + name + "' is merged; unmerge() it before setting W");
    }
    const bool has_bias = visit_adapter_layer(model, i, who, [](const auto& l) { return l.has_bias(); });
    const Index k = model.layer(i).in_features(), d = model.layer(i).out_features();
    // `shapes`: the shapes accepted, the first one named in the message (a bias may be [d] or [1 x d]).
    const auto read = [&](const std::string& key, const std::vector<std::vector<std::int64_t>>& shapes, Index rows,
                          Index cols) {
      const std::vector<std::int64_t> got = file.shape(key);
      bool fits = false;
      for (const auto& shape : shapes) fits = fits || got == shape;
      if (!fits) {
        fail("tensor '" + key + "' has shape " + shape_text(got) + ", layer '" + name + "' (" + std::to_string(k) +
             " -> " + std::to_string(d) + ") needs " + shape_text(shapes.front()));
      }
      const std::vector<float> values = file.to_float(key);
      HostMatrix<float> m = Eigen::Map<const HostMatrix<float>>(values.data(), rows, cols);
      if (!m.allFinite()) fail("tensor '" + key + "' holds NaN or Inf");
      return m;
    };
    Pending p;
    const std::string w_key = prefix + name + ".weight", b_key = prefix + name + ".bias";
    if (!file.contains(w_key)) fail("tensor '" + w_key + "' (the weight of layer '" + name + "') is missing");
    const FrozenBase<float>& base =
        visit_adapter_layer(model, i, who, [](const auto& l) -> const FrozenBase<float>& { return l.base(); });
    const bool same_format =
        base.low_precision() &&
        file.dtype(w_key) == (base.precision() == BasePrecision::bf16 ? Dtype::BF16 : Dtype::F16);
    if (same_format) {
      const std::vector<std::int64_t> got = file.shape(w_key);
      if (got != std::vector<std::int64_t>{d, k}) {
        fail("tensor '" + w_key + "' has shape " + shape_text(got) + ", layer '" + name + "' (" + std::to_string(k) +
             " -> " + std::to_string(d) + ") needs " + shape_text({d, k}));
      }
      HalfHostMatrix h{base.precision(), d, k, std::vector<std::uint16_t>(std::size_t(d * k))};
      const std::uint8_t* bytes = file.raw_data(w_key);
      for (std::size_t j = 0; j < h.bits.size(); ++j) {
        h.bits[j] = std::uint16_t(bytes[2 * j] | (std::uint16_t(bytes[2 * j + 1]) << 8));
      }
      try {
        base.check_weight_bits(h, "tensor '" + w_key + "'");
      } catch (const IoError& e) {
        fail(e.what());
      }
      p.W_bits = std::move(h);
      p.keeps_format = true;
    } else {
      p.W = read(w_key, {{d, k}}, d, k);  // another format: converted, and rounded to nearest into a 16-bit W
    }
    if (has_bias) {
      if (!file.contains(b_key)) {
        fail("tensor '" + b_key + "' is missing, but layer '" + name + "' has a bias (build it with BiasMode::none "
             "for a Linear without one)");
      }
      p.b = read(b_key, {{d}, {1, d}}, 1, d);
    } else if (file.contains(b_key)) {
      fail("the file has a bias '" + b_key + "' but layer '" + name +
           "' was built with BiasMode::none; build it with BiasMode::frozen (or trainable) to load it");
    }
    pending.push_back(std::move(p));
  }
  for (std::size_t i = 0; i < model.size(); ++i) {
    visit_adapter_layer(model, i, "load_base_weights", [&](auto& l) {
      if (pending[i].keeps_format) {
        l.set_W_bits(pending[i].W_bits);
      } else {
        l.set_W(pending[i].W);
      }
      if (l.has_bias()) l.set_b(pending[i].b);
    });
    if (auto* dora = dynamic_cast<DoraLinear<float>*>(&model.layer(i))) {
      // m was initialised from the W the layer was built with; a new W needs its own, as PEFT
      // initialises m from the base weights it wraps.
      dora->set_m(magnitude_init(*model.backend_ptr(), *dora));
    }
  }
}

void save_base_weights(const Model<float>& model, const std::string& safetensors_path, const std::string& prefix) {
  Backend<float>& backend = *model.backend_ptr();
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  for (std::size_t i = 0; i < model.size(); ++i) {
    const FrozenBase<float>& base = visit_adapter_layer(
        model, i, "save_base_weights", [](const auto& l) -> const FrozenBase<float>& { return l.base(); });
    if (base.low_precision()) {  // a 16-bit W in its own format, bit for bit
      const HalfHostMatrix W = base.weight_bits();
      std::vector<std::uint8_t> bytes(W.bits.size() * 2);
      for (std::size_t j = 0; j < W.bits.size(); ++j) {
        bytes[2 * j] = std::uint8_t(W.bits[j] & 0xFF);
        bytes[2 * j + 1] = std::uint8_t(W.bits[j] >> 8);
      }
      writer.add_raw(prefix + model.name(i) + ".weight", W.format == BasePrecision::bf16 ? Dtype::BF16 : Dtype::F16,
                     {W.rows, W.cols}, bytes.data());
      if (base.has_bias()) {
        const HostMatrix<float> b = to_host(backend, base.bias());
        writer.add(prefix + model.name(i) + ".bias", {base.out_features()}, b.data());
      }
      continue;
    }
    visit_adapter_layer(model, i, "save_base_weights", [&](const auto& layer) {
      const HostMatrix<float> W = to_host(backend, layer.W());
      writer.add(prefix + model.name(i) + ".weight", {W.rows(), W.cols()}, W.data());
      if (layer.has_bias()) {
        const HostMatrix<float> b = to_host(backend, layer.b());
        writer.add(prefix + model.name(i) + ".bias", {layer.out_features()}, b.data());
      }
    });
  }
  writer.write_atomically(safetensors_path);
}

}  // namespace relora
