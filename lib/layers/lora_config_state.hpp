#pragma once
// A LoraConfig in a layer's saved state ("config.<field>"), and the check that a saved one is the
// layer's own: shared by the layer kinds built on LoraConfig (LoraLinear, DoraLinear).
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "relora/core/errors.hpp"
#include "relora/core/state_dict.hpp"
#include "relora/layers/lora_config.hpp"

namespace relora {
namespace config_state {

// The shortest decimal that reads back as x, with ".0" on whole numbers, as JSON writes it.
inline std::string number_text(double x) {
  std::string text;
  for (int digits = 15; digits <= 17; ++digits) {
    std::ostringstream out;
    out.precision(digits);
    out << x;
    text = out.str();
    if (std::stod(text) == x) break;
  }
  if (std::isfinite(x) && text.find_first_of(".eE") == std::string::npos) text += ".0";
  return text;
}

inline const char* init_text(LoraInit i) { return i == LoraInit::kaiming_uniform ? "kaiming_uniform" : "gaussian"; }

inline const char* bias_text(BiasMode b) {
  switch (b) {
    case BiasMode::none: return "none";
    case BiasMode::frozen: return "frozen";
    case BiasMode::trainable: return "trainable";
  }
  return "?";
}

[[noreturn]] inline void mismatch(const char* field, const std::string& saved, const std::string& mine) {
  throw IoError(std::string("config field '") + field + "' is " + saved + " in the checkpoint but " + mine +
                " in the model");
}

template <typename T>
void same_number(const StateDict<T>& state, const char* field, double mine) {
  const double saved = state.number(std::string("config.") + field);
  if (saved != mine) mismatch(field, number_text(saved), number_text(mine));
}

template <typename T>
void same_text(const StateDict<T>& state, const char* field, const std::string& mine) {
  const std::string& saved = state.text(std::string("config.") + field);
  if (saved != mine) mismatch(field, "'" + saved + "'", "'" + mine + "'");
}

template <typename T>
void save(const LoraConfig& config, StateDict<T>& state) {
  state.set("config.in_features", std::int64_t(config.in_features));
  state.set("config.out_features", std::int64_t(config.out_features));
  state.set("config.rank", std::int64_t(config.rank));
  state.set("config.alpha", config.alpha);
  state.set("config.rslora", config.rslora);
  state.set("config.dropout", config.dropout);
  state.set("config.init", std::string(init_text(config.init)));
  state.set("config.init_std", config.init_std);
  state.set("config.bias", std::string(bias_text(config.bias)));
  state.set("config.seed", std::uint64_t(config.seed));
  state.set("config.base_precision", std::string(precision_name(config.base_precision)));
  state.set("config.base_merge", std::string(base_merge_name(config.base_merge)));
}

// Throws IoError naming the first field of `state` that differs from `config`.
template <typename T>
void check(const LoraConfig& config, const StateDict<T>& state) {
  const auto same_int = [&](const char* field, std::int64_t mine) {
    const std::int64_t saved = state.integer(std::string("config.") + field);
    if (saved != mine) mismatch(field, std::to_string(saved), std::to_string(mine));
  };
  same_int("in_features", config.in_features);
  same_int("out_features", config.out_features);
  same_int("rank", config.rank);
  same_number(state, "alpha", config.alpha);
  if (state.boolean("config.rslora") != config.rslora) {
    mismatch("rslora", state.boolean("config.rslora") ? "true" : "false", config.rslora ? "true" : "false");
  }
  same_number(state, "dropout", config.dropout);
  same_text(state, "init", init_text(config.init));
  same_number(state, "init_std", config.init_std);
  same_text(state, "bias", bias_text(config.bias));
  if (state.unsigned_integer("config.seed") != config.seed) {
    mismatch("seed", std::to_string(state.unsigned_integer("config.seed")), std::to_string(config.seed));
  }
  // A checkpoint written before 16-bit bases has neither field: its base is fp32.
  if (state.has("config.base_precision") || config.base_precision != BasePrecision::fp32) {
    same_text(state, "base_precision", precision_name(config.base_precision));
  }
  if (config.base_precision != BasePrecision::fp32) same_text(state, "base_merge", base_merge_name(config.base_merge));
}

}  // namespace config_state
}  // namespace relora
