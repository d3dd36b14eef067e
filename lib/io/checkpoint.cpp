#include "relora/io/checkpoint.hpp"

#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <type_traits>
#include <variant>

#include "relora/core/host_matrix.hpp"
#include "relora/core/state_dict.hpp"
#include "relora/io/atomic_file.hpp"
#include "relora/io/checksum.hpp"
#include "relora/io/safetensors.hpp"

namespace relora {
namespace {

using nlohmann::json;

const char* activation_text(Activation a) {
  switch (a) {
    case Activation::identity: return "identity";
    case Activation::relu: return "relu";
    case Activation::tanh: return "tanh";
    case Activation::gelu: return "gelu";
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

// Where each component's tensors live in the file.
std::string layer_prefix(const std::string& layer) { return "model." + layer + "."; }
constexpr const char* kOptimizerPrefix = "optim.";

// Members of a component's JSON object that the checkpoint itself writes, beside the component's
// own fields.
const std::set<std::string> kLayerKeys = {"name", "activation", "kind"};
const std::set<std::string> kOptimizerKeys = {"phase", "kind", "params"};

// What set_steps_done(steps) will make train: the trainer's own rule (Trainer::target_at).
template <typename T>
TrainTarget phase_at(Trainer<T>& trainer, std::int64_t steps) {
  if (trainer.config().method == TrainingMethod::full_finetune) return TrainTarget::base;
  if (trainer.controller() && trainer.controller()->in_warm_start(steps)) return TrainTarget::base;
  return TrainTarget::adapter;
}

// ---- a component's StateDict in the file: tensors under a prefix, fields as JSON members. A
// field named with dots ("config.rank") is a member of a nested object ({"config": {"rank": ..}}).

template <typename T>
void add_fields(json& object, const StateDict<T>& state) {
  for (const auto& [name, field] : state.fields()) {
    json* at = &object;
    std::size_t begin = 0;
    for (std::size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', begin)) {
      at = &(*at)[name.substr(begin, dot - begin)];
      begin = dot + 1;
    }
    const std::string leaf = name.substr(begin);
    std::visit([&](const auto& value) { (*at)[leaf] = value; }, field);
  }
}

template <typename T>
void add_tensors(SafetensorsWriter& writer, const std::string& prefix, const StateDict<T>& state) {
  for (const auto& [name, tensor] : state.tensors()) writer.add(prefix + name, {tensor.rows(), tensor.cols()}, tensor.data());
  // A 16-bit base keeps its format: BF16 or F16, bit for bit (little-endian, as safetensors stores).
  for (const auto& [name, half] : state.half_tensors()) {
    std::vector<std::uint8_t> bytes(half.bits.size() * 2);
    for (std::size_t i = 0; i < half.bits.size(); ++i) {
      bytes[2 * i] = std::uint8_t(half.bits[i] & 0xFF);
      bytes[2 * i + 1] = std::uint8_t(half.bits[i] >> 8);
    }
    writer.add_raw(prefix + name, half.format == BasePrecision::bf16 ? Dtype::BF16 : Dtype::F16,
                   {half.rows, half.cols}, bytes.data());
  }
}

std::uint64_t checksum_of(const std::uint8_t* data_section, std::size_t size, const std::string& state) {
  Fnv1a64 hash;
  hash.update(data_section, size);
  hash.update(state.data(), state.size());
  return hash.value();
}

// ---- loading: everything is read and checked first; a complete plan is applied, and an apply
// that fails half-way is rolled back from a snapshot of the trainer taken before it.

class Reader {
 public:
  explicit Reader(std::string source) : source_(std::move(source)) {}
  [[noreturn]] void fail(const std::string& what) const { throw IoError(source_ + ": " + what); }

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
  std::string text(const json& object, const char* key, const std::string& where) const {
    const json& v = field(object, key, where);
    if (!v.is_string()) fail(where + "." + key + " is not a string");
    return v.get<std::string>();
  }

  // The members of `object` other than `skip`, nested objects flattened into dotted names.
  template <typename T>
  void read_fields(const json& object, const std::set<std::string>& skip, const std::string& where,
                   StateDict<T>& state, const std::string& prefix = "") const {
    if (!object.is_object()) fail(where + " is not a JSON object");
    for (const auto& [key, value] : object.items()) {
      if (prefix.empty() && skip.count(key)) continue;
      const std::string name = prefix + key;
      if (value.is_object()) {
        read_fields(value, skip, where, state, name + ".");
      } else if (value.is_number_unsigned()) {
        state.set(name, value.template get<std::uint64_t>());
      } else if (value.is_number_integer()) {
        state.set(name, value.template get<std::int64_t>());
      } else if (value.is_number_float()) {
        state.set(name, value.template get<double>());
      } else if (value.is_boolean()) {
        state.set(name, value.template get<bool>());
      } else if (value.is_string()) {
        state.set(name, value.template get<std::string>());
      } else {
        fail(where + "." + name + " is not a number, a boolean, a string or an object");
      }
    }
  }

  // Every tensor of the file under `prefix`, the prefix taken off, in the trainer's scalar type
  // (its owner checks the shapes and values).
  template <typename T>
  void read_tensors(const SafetensorsFile& file, const std::string& prefix, StateDict<T>& state,
                    std::set<std::string>& claimed) const {
    for (const std::string& name : file.names()) {
      if (name.rfind(prefix, 0) != 0) continue;
      const Dtype dtype = file.dtype(name);
      const bool half = dtype == Dtype::BF16 || dtype == Dtype::F16;  // a 16-bit base weight or bias
      if (dtype != scalar_dtype<T>() && !half) {
        fail("tensor '" + name + "' is " + dtype_name(dtype) + ", expected " + scalar_text<T>() +
             " (the trainer's scalar type) or BF16/F16 (a 16-bit base)");
      }
      const std::vector<std::int64_t>& shape = file.shape(name);
      if (shape.size() != 2) fail("tensor '" + name + "' has shape " + shape_text(shape) + ", not a matrix");
      if (half) {
        HalfHostMatrix h{dtype == Dtype::BF16 ? BasePrecision::bf16 : BasePrecision::fp16, shape[0], shape[1],
                         std::vector<std::uint16_t>(std::size_t(shape[0] * shape[1]))};
        const std::uint8_t* bytes = file.raw_data(name);
        for (std::size_t i = 0; i < h.bits.size(); ++i) {
          h.bits[i] = std::uint16_t(bytes[2 * i] | (std::uint16_t(bytes[2 * i + 1]) << 8));
        }
        state.set_half_tensor(name.substr(prefix.size()), std::move(h));
        claimed.insert(name);
        continue;
      }
      HostMatrix<T> host(shape[0], shape[1]);
      if (host.size() > 0) std::memcpy(host.data(), file.raw_data(name), file.raw_size(name));
      state.set_tensor(name.substr(prefix.size()), std::move(host));
      claimed.insert(name);
    }
    state.set_origin(prefix);
  }

 private:
  std::string source_;
};

template <typename T>
struct Plan {
  std::vector<StateDict<T>> layers;
  std::int64_t steps_done = 0;
  std::optional<StateDict<T>> controller;
  std::optional<ScheduleState> schedule;
  std::optional<StateDict<T>> optimizer;  // none: the file's optimizer belongs to the phase just ended
};

// Runs `check`, naming `where` in front of the IoError it throws.
template <typename Check>
void checked(const Reader& r, const std::string& where, Check&& check) {
  try {
    check();
  } catch (const IoError& e) {
    std::string what = e.what();
    if (what.rfind("state: ", 0) == 0) what = what.substr(7);
    r.fail(where + ": " + what);
  }
}

json parse_state(const Reader& r, const SafetensorsFile& file) {
  const auto format = file.metadata_value("format");
  if (format != std::string(kCheckpointFormat)) {
    r.fail("not a relora checkpoint: metadata 'format' is " + (format ? "'" + *format + "'" : std::string("absent")) +
           ", expected '" + kCheckpointFormat + "'");
  }
  const auto version = file.metadata_value("version");
  if (version != std::string(kCheckpointVersion) && version != std::string(kCheckpointFirstVersion)) {
    r.fail("checkpoint version " + (version ? "'" + *version + "'" : std::string("absent")) +
           " is not supported: this build reads versions '" + kCheckpointFirstVersion + "' to '" +
           kCheckpointVersion + "'");
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
  return state;
}

template <typename T>
Plan<T> make_plan(const Reader& r, const SafetensorsFile& file, Trainer<T>& trainer) {
  const json state = parse_state(r, file);
  const std::string scalar = r.text(state, "scalar", "state");
  if (scalar != scalar_text<T>()) {
    r.fail("the checkpoint holds " + scalar + " tensors but the trainer trains in " + scalar_text<T>());
  }
  Plan<T> plan;
  std::set<std::string> claimed;  // tensors some component took

  const json& saved_trainer = r.field(state, "trainer", "state");
  const std::string method = r.text(saved_trainer, "method", "state.trainer");
  if (method != method_text(trainer.config().method)) {
    r.fail("the checkpoint was trained with method '" + method + "' but the trainer uses '" +
           method_text(trainer.config().method) + "'");
  }
  plan.steps_done = r.integer(saved_trainer, "steps_done", "state.trainer");
  if (plan.steps_done > kMaxSteps) r.fail("state.trainer.steps_done " + std::to_string(plan.steps_done) + " is beyond any run");

  // Every layer checks its own state.
  Model<T>& model = trainer.model();
  const json& layers = r.field(state, "layers", "state");
  if (!layers.is_array()) r.fail("state.layers is not an array");
  if (layers.size() != model.size()) {
    r.fail("the checkpoint has " + std::to_string(layers.size()) + " layers, the model " + std::to_string(model.size()));
  }
  for (std::size_t i = 0; i < model.size(); ++i) {
    const json& saved = layers[i];
    const std::string& name = model.name(i);
    const Layer<T>& layer = model.layer(i);
    const std::string where = "layer " + std::to_string(i) + " ('" + name + "')";
    const std::string saved_name = r.text(saved, "name", where);
    if (saved_name != name) r.fail(where + ": the checkpoint names this layer '" + saved_name + "'");
    const std::string activation = r.text(saved, "activation", where);
    if (activation != activation_text(model.activation(i))) {
      r.fail(where + ": activation is '" + activation + "' in the checkpoint but '" +
             activation_text(model.activation(i)) + "' in the model");
    }
    const std::string kind = saved.contains("kind") ? r.text(saved, "kind", where) : std::string("lora");  // version 1
    if (kind != layer.kind()) {
      r.fail(where + ": a '" + kind + "' layer in the checkpoint but a '" + layer.kind() + "' layer in the model");
    }
    StateDict<T> layer_state;
    r.read_fields(saved, kLayerKeys, where, layer_state);
    r.read_tensors(file, layer_prefix(name), layer_state, claimed);
    checked(r, where, [&] { layer.check_state(layer_state); });
    plan.layers.push_back(std::move(layer_state));
  }

  const json& saved_controller = r.field(state, "controller", "state");
  if (ReloraController<T>* controller = trainer.controller()) {
    if (saved_controller.is_null()) r.fail("the trainer restarts (ReLoRA) but the checkpoint has no controller state");
    StateDict<T> controller_state;
    r.read_fields(saved_controller, {}, "state.controller", controller_state);
    checked(r, "controller", [&] { controller->check_state(controller_state, plan.steps_done); });
    plan.controller = std::move(controller_state);
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

  // The optimizer's state is checked by the optimizer the resumed step trains with, once the
  // trainer is at that step (apply); its kind and phase are checked here.
  const json& saved_optimizer = r.field(state, "optimizer", "state");
  const std::string phase = r.text(saved_optimizer, "phase", "state.optimizer");
  const TrainTarget resumed = phase_at(trainer, plan.steps_done);
  StateDict<T> optimizer_state;
  r.read_tensors(file, kOptimizerPrefix, optimizer_state, claimed);
  if (phase == phase_text(resumed)) {
    const std::string kind = saved_optimizer.contains("kind") ? r.text(saved_optimizer, "kind", "state.optimizer")
                                                              : std::string("adam");  // version 1
    if (kind != trainer.optimizer().kind()) {
      r.fail("the optimizer state is " + kind + "'s but the trainer's optimizer is " + trainer.optimizer().kind());
    }
    r.read_fields(saved_optimizer, kOptimizerKeys, "state.optimizer", optimizer_state);
    if (optimizer_state.has("steps_taken")) {
      const std::int64_t steps_taken = optimizer_state.integer("steps_taken");
      if (steps_taken > plan.steps_done) {
        r.fail("state.optimizer.steps_taken " + std::to_string(steps_taken) + " exceeds steps_done " +
               std::to_string(plan.steps_done));
      }
    }
    plan.optimizer = std::move(optimizer_state);
  } else if (!(phase == "base" && resumed == TrainTarget::adapter && trainer.controller() &&
               plan.steps_done == trainer.controller()->config().warm_start_steps)) {
    // (Saved right as the warm start ended, the next step would build a fresh optimizer for the
    // adapters, and so does set_steps_done: the saved one is not needed.)
    r.fail("the optimizer was saved training the " + phase + " weights, but after " +
           std::to_string(plan.steps_done) + " steps this trainer trains the " + phase_text(resumed) + " weights");
  }

  for (const std::string& name : file.names()) {
    if (!claimed.count(name)) r.fail("tensor '" + name + "' belongs to no layer and not to the optimizer");
  }
  return plan;
}

template <typename T>
void apply_plan(const Reader& r, const Plan<T>& plan, Trainer<T>& trainer) {
  Model<T>& model = trainer.model();
  for (std::size_t i = 0; i < model.size(); ++i) model.layer(i).restore_state(plan.layers[i]);
  trainer.set_steps_done(plan.steps_done);  // sets what trains and builds a fresh optimizer
  if (plan.controller) trainer.controller()->restore_state(*plan.controller, plan.steps_done);
  if (plan.schedule) trainer.schedule()->restore(*plan.schedule);
  if (plan.optimizer) checked(r, "optimizer", [&] { trainer.optimizer().restore_state(*plan.optimizer); });
}

}  // namespace

template <typename T>
std::vector<std::uint8_t> serialize_checkpoint(Trainer<T>& trainer) {
  Model<T>& model = trainer.model();
  SafetensorsWriter writer;
  json layers = json::array();
  for (std::size_t i = 0; i < model.size(); ++i) {
    StateDict<T> layer_state;
    model.layer(i).save_state(layer_state);
    add_tensors(writer, layer_prefix(model.name(i)), layer_state);
    json saved{{"name", model.name(i)},
               {"activation", activation_text(model.activation(i))},
               {"kind", model.layer(i).kind()}};
    add_fields(saved, layer_state);
    layers.push_back(std::move(saved));
  }
  Optimizer<T>& optimizer = trainer.optimizer();
  StateDict<T> optimizer_state;
  optimizer.save_state(optimizer_state);
  add_tensors(writer, kOptimizerPrefix, optimizer_state);
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
    StateDict<T> controller_state;
    controller->save_state(controller_state);
    json saved = json::object();
    add_fields(saved, controller_state);
    state["controller"] = std::move(saved);
  } else {
    state["controller"] = nullptr;
  }
  const std::string state_text = state.dump();

  writer.set_metadata("format", kCheckpointFormat);
  writer.set_metadata("version", kCheckpointVersion);
  writer.set_metadata("state", state_text);
  // The data section depends on the tensors alone, so the checksum can be taken from a first
  // serialization and the second differs only in the checksum's 16 digits.
  writer.set_metadata("checksum", checksum_hex(0));
  const std::vector<std::uint8_t> draft = writer.serialize();
  std::uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | draft[static_cast<std::size_t>(i)];
  const std::size_t data_start = 8 + static_cast<std::size_t>(header_size);
  writer.set_metadata("checksum",
                      checksum_hex(checksum_of(draft.data() + data_start, draft.size() - data_start, state_text)));
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
  const Plan<T> plan = make_plan(reader, file, trainer);
  // Every component has checked its part but the optimizer, which exists only once the trainer is
  // at the resumed step: should anything still refuse, the trainer goes back to this snapshot.
  const std::vector<std::uint8_t> snapshot = serialize_checkpoint(trainer);
  try {
    apply_plan(reader, plan, trainer);
  } catch (const Error& e) {
    const Reader self("snapshot");
    apply_plan(self, make_plan(self, SafetensorsFile::parse(snapshot.data(), snapshot.size(), "snapshot"), trainer),
               trainer);
    if (dynamic_cast<const IoError*>(&e)) throw;
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
