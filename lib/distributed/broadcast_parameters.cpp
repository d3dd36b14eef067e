#include "relora/distributed/broadcast_parameters.hpp"

#include <nlohmann/json.hpp>
#include <variant>

#include "distributed/rank_agreement.hpp"
#include "relora/core/state_dict.hpp"

namespace relora {
namespace {

using nlohmann::json;

// A layer's state without its tensors' values: its kind, its fields (each with its type, so that
// it reads back as it was) and its tensors' names and shapes, which tell the receivers what
// follows.
template <typename T>
json describe(const Layer<T>& layer, const StateDict<T>& state) {
  json fields = json::object();
  for (const auto& entry : state.fields()) {
    json& field = fields[entry.first];
    std::visit(
        [&field](const auto& value) {
          using V = std::decay_t<decltype(value)>;
          const char* type = std::is_same<V, std::int64_t>::value    ? "i"
                             : std::is_same<V, std::uint64_t>::value ? "u"
                             : std::is_same<V, double>::value        ? "d"
                             : std::is_same<V, bool>::value          ? "b"
                                                                     : "s";
          field = json::array({type, value});  // doubles are written with enough digits to read back exactly
        },
        entry.second);
  }
  json tensors = json::object();
  for (const auto& entry : state.tensors()) tensors[entry.first] = {entry.second.rows(), entry.second.cols()};
  json halves = json::object();
  for (const auto& entry : state.half_tensors()) {
    halves[entry.first] = {entry.second.rows, entry.second.cols, entry.second.format == BasePrecision::bf16 ? "bf16" : "fp16"};
  }
  return json{{"kind", layer.kind()}, {"fields", fields}, {"tensors", tensors}, {"half_tensors", halves}};
}

template <typename T>
void read_fields(const json& fields, StateDict<T>& state) {
  for (auto it = fields.begin(); it != fields.end(); ++it) {
    const std::string& name = it.key();
    const std::string type = it.value().at(0).get<std::string>();
    const json& value = it.value().at(1);
    if (type == "i") state.set(name, value.get<std::int64_t>());
    if (type == "u") state.set(name, value.get<std::uint64_t>());
    if (type == "d") state.set(name, value.get<double>());
    if (type == "b") state.set(name, value.get<bool>());
    if (type == "s") state.set(name, value.get<std::string>());
  }
}

template <typename T>
void throw_if_failed(const RankFailure& failed) {
  if (failed) throw ConfigError("broadcast_parameters: rank " + std::to_string(failed.rank) + ": " + failed.message);
}

}  // namespace

template <typename T>
void broadcast_parameters(Model<T>& model, Communicator<T>& communicator, int root) {
  if (root < 0 || root >= communicator.size()) {
    throw ConfigError("broadcast_parameters: root " + std::to_string(root) + " is outside [0, " +
                      std::to_string(communicator.size()) + ")");
  }
  Backend<T>& backend = model.backend();
  const bool sending = communicator.rank() == root;

  // The root's layers, described; every rank follows the description, so the collectives match
  // even where the models do not.
  std::vector<StateDict<T>> roots(model.size());
  json description = json::array();
  if (sending) {
    for (std::size_t i = 0; i < model.size(); ++i) {
      model.layer(i).save_state(roots[i]);
      description.push_back(describe(model.layer(i), roots[i]));
    }
  }
  description = json::parse(broadcast_text(communicator, backend, sending ? description.dump() : std::string(), root));
  std::string failure;
  if (description.size() != model.size()) {
    failure = "its model has " + std::to_string(model.size()) + " layers, rank " + std::to_string(root) + "'s " +
              std::to_string(description.size());
  }
  roots.resize(description.size());

  // Every tensor, in the description's order; then each receiving layer checks the root's state.
  for (std::size_t i = 0; i < description.size(); ++i) {
    const json& layer = description[i];
    StateDict<T>& state = roots[i];
    const json& tensors = layer.at("tensors");
    for (auto it = tensors.begin(); it != tensors.end(); ++it) {
      const std::string& name = it.key();
      const Index rows = it.value().at(0).get<Index>(), cols = it.value().at(1).get<Index>();
      HostMatrix<T> values = sending ? state.tensors().at(name) : HostMatrix<T>(rows, cols);
      broadcast_host(communicator, backend, values, root);
      if (!sending) state.set_tensor(name, std::move(values));
    }
    const json& halves = layer.at("half_tensors");
    for (auto it = halves.begin(); it != halves.end(); ++it) {
      const std::string& name = it.key();
      const json& shape = it.value();
      const Index rows = shape.at(0).get<Index>(), cols = shape.at(1).get<Index>();
      HostMatrix<T> bits(rows, cols);  // whole numbers below 2^16: exact in either type
      if (sending) {
        const HalfHostMatrix& half = state.half_tensors().at(name);
        for (Index j = 0; j < bits.size(); ++j) bits.data()[j] = T(half.bits[std::size_t(j)]);
      }
      broadcast_host(communicator, backend, bits, root);
      if (sending) continue;
      HalfHostMatrix half{shape.at(2).get<std::string>() == "bf16" ? BasePrecision::bf16 : BasePrecision::fp16, rows,
                          cols, std::vector<std::uint16_t>(std::size_t(rows * cols))};
      for (Index j = 0; j < bits.size(); ++j) half.bits[std::size_t(j)] = std::uint16_t(bits.data()[j]);
      state.set_half_tensor(name, std::move(half));
    }
    if (sending || !failure.empty()) continue;
    read_fields(layer.at("fields"), state);
    const std::string where = "layer " + std::to_string(i) + " ('" + model.name(i) + "')";
    const std::string kind = layer.at("kind").get<std::string>();
    if (kind != model.layer(i).kind()) {
      failure = where + " is a '" + model.layer(i).kind() + "' layer, rank " + std::to_string(root) + "'s a '" + kind + "' layer";
      continue;
    }
    try {
      model.layer(i).check_state(state);
    } catch (const IoError& e) {
      failure = where + " does not match rank " + std::to_string(root) + "'s: " + e.what();
    }
  }
  throw_if_failed<T>(agree_on_failure(communicator, backend, failure));
  if (!sending) {
    for (std::size_t i = 0; i < model.size(); ++i) model.layer(i).restore_state(roots[i]);
  }
}

template void broadcast_parameters(Model<float>&, Communicator<float>&, int);
template void broadcast_parameters(Model<double>&, Communicator<double>&, int);

}  // namespace relora
