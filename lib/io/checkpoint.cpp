#include "relora/io/checkpoint.hpp"

#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <type_traits>
#include <variant>

#include "relora/io/atomic_file.hpp"
#include "relora/io/checksum.hpp"
#include "relora/core/host_matrix.hpp"
#include "relora/io/safetensors.hpp"
#include "relora/core/state_dict.hpp"

namespace relora {
namespace {

using nlohmann::json;

// ---- names of enums in the state JSON

const char* activation_text(Activation a) {
  switch (a) {
    case Activation::identity: return "identity";
    case Activation::relu: return "relu";
    case Activation::tanh: return "tanh";
    case Activation::gelu: return "gelu";
  }
  return "?";
}

const char* init_text(LoraInit i) { return i == LoraInit::kaiming_uniform ? "kaiming_uniform" : "gaussian"; }

const char* bias_text(BiasMode b) {
  switch (b) {
    case BiasMode::none: return "none";
    case BiasMode::frozen: return "frozen";
    case BiasMode::trainable: return "trainable";
  }
  return "?";
}

const char* method_text(TrainingMethod m) {
  switch (m) {
    case TrainingMethod::lora: return "lora";
    case TrainingMethod::relora: return "relora";
    case TrainingMethod::full_finetune: return "full_finetune";
  }
  return "?";
}

const char* phase_text(TrainTarget t) { return t == TrainTarget::adapter ? "adapter" : "base"; }

template <typename T>
constexpr const char* scalar_text() {
  return std::is_same<T, float>::value ? "F32" : "F64";
}

template <typename T>
constexpr Dtype scalar_dtype() {
  return std::is_same<T, float>::value ? Dtype::F32 : Dtype::F64;
}

// No run takes 2^53 steps; a larger count is corruption (and would overflow a step counter).
constexpr std::int64_t kMaxSteps = std::int64_t(1) << 53;

std::string layer_key(const std::string& layer, const char* what) { return "model." + layer + "." + what; }
// The optimizer's tensors are stored under this prefix, named as its save_state names them.
constexpr const char* kOptimizerPrefix = "optim.";

// What set_steps_done(steps) will make train: the trainer's own rule (Trainer::target_at).
template <typename T>
TrainTarget phase_at(Trainer<T>& trainer, std::int64_t steps) {
  if (trainer.config().method == TrainingMethod::full_finetune) return TrainTarget::base;
  if (trainer.controller() && trainer.controller()->in_warm_start(steps)) return TrainTarget::base;
  return TrainTarget::adapter;
}

json config_json(const LoraConfig& c) {
  return json{{"in_features", c.in_features}, {"out_features", c.out_features},
              {"rank", c.rank},               {"alpha", c.alpha},
              {"rslora", c.rslora},           {"dropout", c.dropout},
              {"init", init_text(c.init)},    {"init_std", c.init_std},
              {"bias", bias_text(c.bias)},    {"seed", c.seed}};
}

// ---- saving

template <typename T>
void add_tensor(SafetensorsWriter& writer, Backend<T>& backend, const std::string& name, const Tensor<T>& t) {
  const HostMatrix<T> host = to_host(backend, t);
  writer.add(name, {t.rows(), t.cols()}, host.data());
}

// The optimizer's fields (StateDict) as JSON members.
template <typename T>
void add_fields(json& object, const StateDict<T>& state) {
  for (const auto& [name, field] : state.fields()) {
    std::visit([&, name = name](const auto& value) { object[name] = value; }, field);
  }
}

template <typename T>
std::string state_json(Trainer<T>& trainer, const StateDict<T>& optimizer_state) {
  Model<T>& model = trainer.model();
  json layers = json::array();
  for (std::size_t i = 0; i < model.size(); ++i) {
    const LoraLinear<T>& layer = model.lora(i);
    layers.push_back(json{{"name", model.name(i)},
                          {"activation", activation_text(model.activation(i))},
                          {"config", config_json(layer.config())},
                          {"merged", layer.merged()},
                          {"training", layer.training()},
                          {"rng_stream", layer.rng_stream()}});
  }
  Optimizer<T>& optimizer = trainer.optimizer();
  json params = json::array();
  for (std::size_t i = 0; i < optimizer.size(); ++i) params.push_back(optimizer.parameter(i).name);
  json saved_optimizer{
      {"phase", phase_text(model.size() > 0 ? model.layer(0).train_target() : phase_at(trainer, trainer.steps_done()))},
      {"kind", optimizer.kind()},
      {"params", params}};
  add_fields(saved_optimizer, optimizer_state);
  json state{{"scalar", scalar_text<T>()},
             {"layers", layers},
             {"trainer", {{"method", method_text(trainer.config().method)}, {"steps_done", trainer.steps_done()}}},
             {"optimizer", saved_optimizer}};
  if (Schedule* schedule = trainer.schedule()) {
    state["schedule"] = {{"describe", schedule->describe()}, {"restart_steps", schedule->save().restart_steps}};
  } else {
    state["schedule"] = nullptr;
  }
  if (ReloraController<T>* controller = trainer.controller()) {
    state["controller"] = {{"restarts_done", controller->restarts_done()},
                           {"restart_every", controller->config().restart_every},
                           {"warm_start_steps", controller->config().warm_start_steps}};
  } else {
    state["controller"] = nullptr;
  }
  return state.dump();
}

std::uint64_t checksum_of(const std::uint8_t* data_section, std::size_t size, const std::string& state) {
  Fnv1a64 hash;
  hash.update(data_section, size);
  hash.update(state.data(), state.size());
  return hash.value();
}

// ---- loading: every check happens on a Plan, and only a complete Plan is applied.

class Reader {
 public:
  explicit Reader(std::string source) : source_(std::move(source)) {}
  [[noreturn]] void fail(const std::string& what) const { throw IoError(source_ + ": " + what); }
  const std::string& source() const { return source_; }

  const json& field(const json& object, const char* key, const std::string& where) const {
    if (!object.is_object()) fail(where + " is not a JSON object");
    const auto it = object.find(key);
    if (it == object.end()) fail(where + " has no field '" + key + "'");
    return *it;
  }
  std::int64_t integer(const json& object, const char* key, const std::string& where, std::int64_t min = 0) const {
    const json& v = field(object, key, where);
    if (!v.is_number_integer()) fail(where + "." + key + " is not an integer");
    if (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(INT64_MAX)) fail(where + "." + key + " is too large");
    const std::int64_t x = v.get<std::int64_t>();
    if (x < min) fail(where + "." + key + " is " + std::to_string(x) + ", below " + std::to_string(min));
    return x;
  }
  std::uint64_t unsigned_integer(const json& object, const char* key, const std::string& where) const {
    const json& v = field(object, key, where);
    if (!v.is_number_unsigned()) fail(where + "." + key + " is not a non-negative integer");
    return v.get<std::uint64_t>();
  }
  double number(const json& object, const char* key, const std::string& where) const {
    const json& v = field(object, key, where);
    if (!v.is_number()) fail(where + "." + key + " is not a number");
    return v.get<double>();
  }
  bool boolean(const json& object, const char* key, const std::string& where) const {
    const json& v = field(object, key, where);
    if (!v.is_boolean()) fail(where + "." + key + " is not true or false");
    return v.get<bool>();
  }
  std::string text(const json& object, const char* key, const std::string& where) const {
    const json& v = field(object, key, where);
    if (!v.is_string()) fail(where + "." + key + " is not a string");
    return v.get<std::string>();
  }

 private:
  std::string source_;
};

template <typename T>
struct LayerPlan {
  HostMatrix<T> W, b, A, B;
  bool merged = false;
  bool training = true;
  std::uint64_t rng_stream = 0;
};


template <typename T>
struct Plan {
  std::vector<LayerPlan<T>> layers;
  std::int64_t steps_done = 0;
  bool load_optimizer = false;  // false: the file's optimizer belongs to the phase just ended
  StateDict<T> optimizer;       // its tensors ("optim." taken off their names) and fields
  std::optional<ScheduleState> schedule;
  std::int64_t restarts_done = 0;
};

// A tensor of the file as a rows x cols host matrix, its dtype, shape and values checked.
template <typename T>
HostMatrix<T> read_tensor(const Reader& r, const SafetensorsFile& file, const std::string& name, Index rows,
                          Index cols) {
  if (!file.contains(name)) r.fail("tensor '" + name + "' is missing");
  if (file.dtype(name) != scalar_dtype<T>()) {
    r.fail(std::string("tensor '") + name + "' is " + dtype_name(file.dtype(name)) + ", expected " +
           scalar_text<T>() + " (the trainer's scalar type)");
  }
  const std::vector<std::int64_t> expected{rows, cols};
  if (file.shape(name) != expected) {
    r.fail("tensor '" + name + "' has shape " + shape_text(file.shape(name)) + ", the model needs " +
           shape_text(expected));
  }
  HostMatrix<T> host(rows, cols);
  if (host.size() > 0) std::memcpy(host.data(), file.raw_data(name), file.raw_size(name));
  if (!host.allFinite()) r.fail("tensor '" + name + "' holds NaN or Inf");
  return host;
}

// A 2-D tensor of the file in the trainer's scalar type, of whatever shape (its owner checks it).
template <typename T>
HostMatrix<T> read_any_tensor(const Reader& r, const SafetensorsFile& file, const std::string& name) {
  if (file.dtype(name) != scalar_dtype<T>()) {
    r.fail(std::string("tensor '") + name + "' is " + dtype_name(file.dtype(name)) + ", expected " +
           scalar_text<T>() + " (the trainer's scalar type)");
  }
  const std::vector<std::int64_t>& shape = file.shape(name);
  if (shape.size() != 2) r.fail("tensor '" + name + "' has shape " + shape_text(shape) + ", not a matrix");
  HostMatrix<T> host(shape[0], shape[1]);
  if (host.size() > 0) std::memcpy(host.data(), file.raw_data(name), file.raw_size(name));
  return host;
}

// The optimizer's saved fields: the members of state.optimizer other than the checkpoint's own.
template <typename T>
void read_fields(const Reader& r, const json& saved, StateDict<T>& state) {
  for (const auto& [key, value] : saved.items()) {
    if (key == "phase" || key == "kind" || key == "params") continue;
    if (value.is_number_unsigned()) {
      state.set(key, value.template get<std::uint64_t>());
    } else if (value.is_number_integer()) {
      state.set(key, value.template get<std::int64_t>());
    } else if (value.is_number_float()) {
      state.set(key, value.template get<double>());
    } else if (value.is_boolean()) {
      state.set(key, value.template get<bool>());
    } else if (value.is_string()) {
      state.set(key, value.template get<std::string>());
    } else {
      r.fail("state.optimizer." + key + " is not a number, a boolean or a string");
    }
  }
}

template <typename T>
void check_layer_config(const Reader& r, const json& saved, const LoraConfig& model, const std::string& where) {
  const auto mismatch = [&](const char* field, const std::string& in_file, const std::string& in_model) {
    r.fail(where + ": config field '" + field + "' is " + in_file + " in the checkpoint but " + in_model +
           " in the model");
  };
  const auto check_int = [&](const char* field, std::int64_t value) {
    const std::int64_t saved_value = r.integer(saved, field, where + ".config");
    if (saved_value != value) mismatch(field, std::to_string(saved_value), std::to_string(value));
  };
  const auto check_double = [&](const char* field, double value) {
    const double saved_value = r.number(saved, field, where + ".config");
    if (saved_value != value) mismatch(field, json(saved_value).dump(), json(value).dump());
  };
  const auto check_text = [&](const char* field, const std::string& value) {
    const std::string saved_value = r.text(saved, field, where + ".config");
    if (saved_value != value) mismatch(field, "'" + saved_value + "'", "'" + value + "'");
  };
  check_int("in_features", model.in_features);
  check_int("out_features", model.out_features);
  check_int("rank", model.rank);
  check_double("alpha", model.alpha);
  const bool rslora = r.boolean(saved, "rslora", where + ".config");
  if (rslora != model.rslora) mismatch("rslora", rslora ? "true" : "false", model.rslora ? "true" : "false");
  check_double("dropout", model.dropout);
  check_text("init", init_text(model.init));
  check_double("init_std", model.init_std);
  check_text("bias", bias_text(model.bias));
  const std::uint64_t seed = r.unsigned_integer(saved, "seed", where + ".config");
  if (seed != model.seed) mismatch("seed", std::to_string(seed), std::to_string(model.seed));
}

template <typename T>
Plan<T> make_plan(const Reader& r, const SafetensorsFile& file, Trainer<T>& trainer) {
  const auto format = file.metadata_value("format");
  if (format != std::string(kCheckpointFormat)) {
    r.fail("not a relora checkpoint: metadata 'format' is " + (format ? "'" + *format + "'" : std::string("absent")) +
           ", expected '" + kCheckpointFormat + "'");
  }
  const auto version = file.metadata_value("version");
  if (version != std::string(kCheckpointVersion)) {
    r.fail("checkpoint version " + (version ? "'" + *version + "'" : std::string("absent")) +
           " is not supported: this build reads version '" + kCheckpointVersion + "'");
  }
  const auto state_text = file.metadata_value("state");
  const auto checksum_text = file.metadata_value("checksum");
  if (!state_text) r.fail("metadata 'state' is missing");
  if (!checksum_text) r.fail("metadata 'checksum' is missing");
  std::uint64_t stored = 0;
  try {
    stored = parse_checksum_hex(*checksum_text);
  } catch (const IoError& e) {
    r.fail(std::string("metadata 'checksum': ") + e.what());
  }
  const std::vector<std::uint8_t>& bytes = file.bytes();
  const std::uint64_t actual = checksum_of(bytes.data() + file.data_start(), bytes.size() - file.data_start(), *state_text);
  if (actual != stored) {
    r.fail("checksum mismatch: the file says " + checksum_hex(stored) + ", its data and state give " +
           checksum_hex(actual) + "; the file is corrupt");
  }

  json state;
  try {
    state = json::parse(*state_text);
  } catch (const json::exception& e) {
    r.fail(std::string("metadata 'state' is not valid JSON: ") + e.what());
  }
  if (!state.is_object()) r.fail("metadata 'state' is not a JSON object");
  const std::string scalar = r.text(state, "scalar", "state");
  if (scalar != scalar_text<T>()) {
    r.fail("the checkpoint holds " + scalar + " tensors but the trainer trains in " + scalar_text<T>());
  }

  Plan<T> plan;
  Model<T>& model = trainer.model();
  const json& layers = r.field(state, "layers", "state");
  if (!layers.is_array()) r.fail("state.layers is not an array");
  if (layers.size() != model.size()) {
    r.fail("the checkpoint has " + std::to_string(layers.size()) + " layers, the model " +
           std::to_string(model.size()));
  }
  for (std::size_t i = 0; i < model.size(); ++i) {
    const json& saved = layers[i];
    const std::string& name = model.name(i);
    const std::string where = "layer " + std::to_string(i) + " ('" + name + "')";
    const std::string saved_name = r.text(saved, "name", where);
    if (saved_name != name) r.fail(where + ": the checkpoint names this layer '" + saved_name + "'");
    const std::string activation = r.text(saved, "activation", where);
    if (activation != activation_text(model.activation(i))) {
      r.fail(where + ": activation is '" + activation + "' in the checkpoint but '" +
             activation_text(model.activation(i)) + "' in the model");
    }
    const LoraLinear<T>& layer = model.lora(i);
    check_layer_config<T>(r, r.field(saved, "config", where), layer.config(), where);

    LayerPlan<T> lp;
    lp.merged = r.boolean(saved, "merged", where);
    lp.training = r.boolean(saved, "training", where);
    lp.rng_stream = r.unsigned_integer(saved, "rng_stream", where);
    const Index k = layer.in_features(), d = layer.out_features(), rank = layer.rank();
    lp.W = read_tensor<T>(r, file, layer_key(name, "weight"), d, k);
    if (layer.has_bias()) lp.b = read_tensor<T>(r, file, layer_key(name, "bias"), 1, d);
    else if (file.contains(layer_key(name, "bias"))) r.fail(where + " has no bias, but the checkpoint holds one");
    lp.A = read_tensor<T>(r, file, layer_key(name, "lora_A"), rank, k);
    lp.B = read_tensor<T>(r, file, layer_key(name, "lora_B"), d, rank);
    plan.layers.push_back(std::move(lp));
  }

  const json& saved_trainer = r.field(state, "trainer", "state");
  const std::string method = r.text(saved_trainer, "method", "state.trainer");
  if (method != method_text(trainer.config().method)) {
    r.fail("the checkpoint was trained with method '" + method + "' but the trainer uses '" +
           method_text(trainer.config().method) + "'");
  }
  plan.steps_done = r.integer(saved_trainer, "steps_done", "state.trainer");
  if (plan.steps_done > kMaxSteps) r.fail("state.trainer.steps_done " + std::to_string(plan.steps_done) + " is beyond any run");

  const json& saved_controller = r.field(state, "controller", "state");
  if (ReloraController<T>* controller = trainer.controller()) {
    if (saved_controller.is_null()) r.fail("the trainer restarts (ReLoRA) but the checkpoint has no controller state");
    plan.restarts_done = r.integer(saved_controller, "restarts_done", "state.controller");
    if (plan.restarts_done > plan.steps_done) {
      r.fail("state.controller.restarts_done " + std::to_string(plan.restarts_done) + " exceeds steps_done " +
             std::to_string(plan.steps_done));
    }
    const auto same = [&](const char* field, std::int64_t value) {
      const std::int64_t saved_value = r.integer(saved_controller, field, "state.controller");
      if (saved_value != value) {
        r.fail(std::string("ReLoRA config field '") + field + "' is " + std::to_string(saved_value) +
               " in the checkpoint but " + std::to_string(value) + " in the trainer");
      }
    };
    same("restart_every", controller->config().restart_every);
    same("warm_start_steps", controller->config().warm_start_steps);
  } else if (!saved_controller.is_null()) {
    r.fail("the checkpoint holds ReLoRA controller state but the trainer has no controller");
  }

  const json& saved_schedule = r.field(state, "schedule", "state");
  if (!saved_schedule.is_null()) {
    const json& steps = r.field(saved_schedule, "restart_steps", "state.schedule");
    if (!steps.is_array()) r.fail("state.schedule.restart_steps is not an array");
    ScheduleState ss;
    for (const json& s : steps) {
      if (!s.is_number_integer() || (s.is_number_unsigned() && s.get<std::uint64_t>() > std::uint64_t(INT64_MAX))) {
        r.fail("state.schedule.restart_steps holds " + s.dump() + ", not a step");
      }
      ss.restart_steps.push_back(s.get<std::int64_t>());
      if (ss.restart_steps.back() < 0 || ss.restart_steps.back() > plan.steps_done) {
        r.fail("state.schedule.restart_steps holds step " + s.dump() + ", outside [0, steps_done = " +
               std::to_string(plan.steps_done) + "]");
      }
    }
    if (trainer.schedule() == nullptr && !ss.restart_steps.empty()) {
      r.fail("the checkpoint holds schedule restarts but the trainer has no schedule");
    }
    if (trainer.schedule() != nullptr) plan.schedule = std::move(ss);
  } else if (trainer.schedule() != nullptr) {
    plan.schedule = ScheduleState{};  // saved without a schedule: nothing has re-warmed
  }

  const json& saved_optimizer = r.field(state, "optimizer", "state");
  const std::string phase = r.text(saved_optimizer, "phase", "state.optimizer");
  const TrainTarget resumed = phase_at(trainer, plan.steps_done);
  if (phase == phase_text(resumed)) {
    plan.load_optimizer = true;
  } else if (phase == "base" && resumed == TrainTarget::adapter && trainer.controller() &&
             plan.steps_done == trainer.controller()->config().warm_start_steps) {
    // Saved right as the warm start ended: the next step would build a fresh optimizer for the
    // adapters, and so does set_steps_done.
    plan.load_optimizer = false;
  } else {
    r.fail("the optimizer was saved training the " + phase + " weights, but after " +
           std::to_string(plan.steps_done) + " steps this trainer trains the " + phase_text(resumed) + " weights");
  }
  if (plan.load_optimizer) {
    // The optimizer checks its own state when it restores it (apply_plan); the kind and the
    // counter of steps are checked here.
    const std::string kind = saved_optimizer.contains("kind") ? r.text(saved_optimizer, "kind", "state.optimizer")
                                                              : std::string("adam");  // before kinds were saved
    if (kind != trainer.optimizer().kind()) {
      r.fail("the optimizer state is " + kind + "'s but the trainer's optimizer is " + trainer.optimizer().kind());
    }
    read_fields(r, saved_optimizer, plan.optimizer);
    if (saved_optimizer.contains("steps_taken")) {
      const std::int64_t steps_taken = r.integer(saved_optimizer, "steps_taken", "state.optimizer");
      if (steps_taken > plan.steps_done) {
        r.fail("state.optimizer.steps_taken " + std::to_string(steps_taken) + " exceeds steps_done " +
               std::to_string(plan.steps_done));
      }
    }
    for (const std::string& name : file.names()) {
      if (name.rfind(kOptimizerPrefix, 0) != 0) continue;
      plan.optimizer.set_tensor(name.substr(std::strlen(kOptimizerPrefix)), read_any_tensor<T>(r, file, name));
    }
    plan.optimizer.set_origin(kOptimizerPrefix);
  }
  return plan;
}

// Puts the trainer at the plan's step, which builds the optimizer the resumed step trains with,
// and restores that optimizer's state. The optimizer checks its state as it restores it, and it
// exists only once the trainer is at the step: so this goes before anything else changes, and if
// the optimizer refuses, the trainer returns to its step and its optimizer to the state it had.
template <typename T>
void restore_trainer(Plan<T>& plan, Trainer<T>& trainer, const std::string& source) {
  const std::int64_t old_steps = trainer.steps_done();
  StateDict<T> old_state;
  if (plan.load_optimizer) trainer.optimizer().save_state(old_state);
  trainer.set_steps_done(plan.steps_done);  // sets what trains and builds a fresh optimizer
  if (!plan.load_optimizer) return;
  try {
    trainer.optimizer().restore_state(plan.optimizer);
  } catch (const Error& e) {
    trainer.set_steps_done(old_steps);
    // The old state fits unless it was saved as a warm start ended, where the next step builds
    // a fresh optimizer anyway.
    try {
      trainer.optimizer().restore_state(old_state);
    } catch (const IoError&) {
    }
    throw IoError(source + ": optimizer " + e.what());
  }
}

template <typename T>
void apply_plan(Plan<T>& plan, Trainer<T>& trainer, const std::string& source) {
  // The schedule's restore may still refuse (unsorted restart steps), and so may the optimizer's:
  // they go first, and are undone if anything after them throws.
  Schedule* schedule = trainer.schedule();
  ScheduleState old_schedule;
  if (schedule != nullptr && plan.schedule) {
    old_schedule = schedule->save();
    schedule->restore(*plan.schedule);
  }
  try {
    restore_trainer(plan, trainer, source);
    Model<T>& model = trainer.model();
    for (std::size_t i = 0; i < model.size(); ++i) {
      LoraLinear<T>& layer = model.lora(i);
      LayerPlan<T>& lp = plan.layers[i];
      StateDict<T> state;
      layer.save_state(state);
      state.set_tensor("weight", lp.W);
      if (layer.has_bias()) state.set_tensor("bias", lp.b);
      state.set_tensor("lora_A", lp.A);
      state.set_tensor("lora_B", lp.B);
      state.set("merged", lp.merged);
      state.set("training", lp.training);
      state.set("rng_stream", lp.rng_stream);
      layer.restore_state(state);
    }
    if (ReloraController<T>* controller = trainer.controller()) controller->set_restarts_done(plan.restarts_done);
  } catch (...) {
    if (schedule != nullptr && plan.schedule) schedule->restore(old_schedule);
    throw;
  }
}

}  // namespace

template <typename T>
std::vector<std::uint8_t> serialize_checkpoint(Trainer<T>& trainer) {
  Model<T>& model = trainer.model();
  Backend<T>& backend = model.backend();
  SafetensorsWriter writer;
  for (std::size_t i = 0; i < model.size(); ++i) {
    const LoraLinear<T>& layer = model.lora(i);
    const std::string& name = model.name(i);
    add_tensor(writer, backend, layer_key(name, "weight"), layer.W());
    if (layer.has_bias()) add_tensor(writer, backend, layer_key(name, "bias"), layer.b());
    add_tensor(writer, backend, layer_key(name, "lora_A"), layer.A());
    add_tensor(writer, backend, layer_key(name, "lora_B"), layer.B());
  }
  StateDict<T> optimizer_state;
  trainer.optimizer().save_state(optimizer_state);
  for (const auto& [name, tensor] : optimizer_state.tensors()) {
    writer.add(kOptimizerPrefix + name, {tensor.rows(), tensor.cols()}, tensor.data());
  }
  const std::string state = state_json(trainer, optimizer_state);
  writer.set_metadata("format", kCheckpointFormat);
  writer.set_metadata("version", kCheckpointVersion);
  writer.set_metadata("state", state);
  // The data section depends on the tensors alone, so the checksum can be taken from a first
  // serialization and the second differs only in the checksum's 16 digits.
  writer.set_metadata("checksum", checksum_hex(0));
  const std::vector<std::uint8_t> draft = writer.serialize();
  std::uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | draft[static_cast<std::size_t>(i)];
  const std::size_t data_start = 8 + static_cast<std::size_t>(header_size);
  writer.set_metadata("checksum", checksum_hex(checksum_of(draft.data() + data_start, draft.size() - data_start, state)));
  return writer.serialize();
}

template <typename T>
void save_checkpoint(const std::string& path, Trainer<T>& trainer) {
  write_file_atomically(path, serialize_checkpoint(trainer));
}

template <typename T>
void load_checkpoint_from_bytes(const std::uint8_t* data, std::size_t size, Trainer<T>& trainer,
                                const std::string& source) {
  const Reader reader(source);
  const SafetensorsFile file = SafetensorsFile::parse(data, size, source);
  Plan<T> plan = make_plan(reader, file, trainer);
  try {
    apply_plan(plan, trainer, source);
  } catch (const IoError&) {
    throw;
  } catch (const Error& e) {
    throw IoError(source + ": " + e.what());
  }
}

template <typename T>
void load_checkpoint(const std::string& path, Trainer<T>& trainer) {
  const std::vector<std::uint8_t> bytes = read_file_bytes(path);
  load_checkpoint_from_bytes(bytes.data(), bytes.size(), trainer, path);
}

template std::vector<std::uint8_t> serialize_checkpoint(Trainer<float>&);
template std::vector<std::uint8_t> serialize_checkpoint(Trainer<double>&);
template void save_checkpoint(const std::string&, Trainer<float>&);
template void save_checkpoint(const std::string&, Trainer<double>&);
template void load_checkpoint(const std::string&, Trainer<float>&);
template void load_checkpoint(const std::string&, Trainer<double>&);
template void load_checkpoint_from_bytes(const std::uint8_t*, std::size_t, Trainer<float>&, const std::string&);
template void load_checkpoint_from_bytes(const std::uint8_t*, std::size_t, Trainer<double>&, const std::string&);

}  // namespace relora
