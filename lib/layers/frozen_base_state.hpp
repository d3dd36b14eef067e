#pragma once
// A FrozenBase in its layer's saved state: "weight" (fp32, or a 16-bit W in its own format, bit for
// bit), "weight_master" (a 16-bit W's fp32 master, when it has one), "bias" (fp32, or a frozen
// bias of a 16-bit base in that format) and "base_rounding_stream" (16-bit only). Shared by the
// layer kinds built on FrozenBase.
#include <string>

#include "relora/core/errors.hpp"
#include "relora/core/state_dict.hpp"
#include "relora/layers/frozen_base.hpp"

namespace relora {

template <typename T>
bool half_bias(const FrozenBase<T>& base, const LoraConfig& config) {
  return base.low_precision() && config.bias == BiasMode::frozen;
}

template <typename T>
void save_base_state(const FrozenBase<T>& base, const LoraConfig& config, Backend<T>& backend, StateDict<T>& state) {
  if (!base.low_precision()) {
    state.set_tensor("weight", to_host(backend, base.weight()));
  } else {
    state.set_half_tensor("weight", base.weight_bits());
    if (base.has_master()) state.set_tensor("weight_master", to_host(backend, base.weight()));
    state.set("base_rounding_stream", std::uint64_t(base.rounding_stream()));
  }
  if (!base.has_bias()) return;
  HostMatrix<T> b = to_host(backend, base.bias());
  if (!half_bias(base, config)) {
    state.set_tensor("bias", std::move(b));
    return;
  }
  HalfHostMatrix h{base.precision(), 1, b.size(), std::vector<std::uint16_t>(std::size_t(b.size()))};
  for (Index i = 0; i < b.size(); ++i) {  // exact: the bias holds values of the format
    h.bits[std::size_t(i)] =
        half_bits::round_float(float(b.data()[i]), base.precision(), HalfRounding::nearest, 0.0f);
  }
  state.set_half_tensor("bias", std::move(h));
}

template <typename T>
void check_base_state(const FrozenBase<T>& base, const LoraConfig& config, const StateDict<T>& state) {
  const Index d = base.out_features(), k = base.in_features();
  if (!base.low_precision()) {
    if (state.has_half_tensor("weight")) {
      throw IoError("state: tensor '" + state.where("weight") + "' is " +
                    precision_name(state.half_tensors().at("weight").format) + " but the layer's base is fp32");
    }
    state.tensor("weight", d, k);
  } else {
    state.half_tensor("weight", d, k, base.precision());
    if (state.has_tensor("weight_master")) state.tensor("weight_master", d, k);
    state.unsigned_integer("base_rounding_stream");
  }
  const bool holds_bias = state.has_tensor("bias") || state.has_half_tensor("bias");
  if (!base.has_bias()) {
    if (holds_bias) throw IoError("the layer has no bias, but the checkpoint holds one");
    return;
  }
  if (half_bias(base, config)) {
    state.half_tensor("bias", 1, d, base.precision());
  } else {
    state.tensor("bias", 1, d);
  }
}

// After check_base_state().
template <typename T>
void restore_base_state(FrozenBase<T>& base, const LoraConfig& config, Backend<T>& backend, const StateDict<T>& state) {
  const Index d = base.out_features(), k = base.in_features();
  if (!base.low_precision()) {
    base.set_weight(state.tensor("weight", d, k));
  } else {
    base.set_weight_bits(state.half_tensor("weight", d, k, base.precision()));
    if (state.has_tensor("weight_master")) {
      upload(backend, state.tensor("weight_master", d, k), base.trainable_weight(), "weight_master");
    }
    base.set_rounding_stream(state.unsigned_integer("base_rounding_stream"));
  }
  if (!base.has_bias()) return;
  if (half_bias(base, config)) {
    const HalfHostMatrix& h = state.half_tensor("bias", 1, d, base.precision());
    HostMatrix<T> b(1, d);
    for (Index i = 0; i < d; ++i) b.data()[i] = T(half_bits::half_to_float(h.bits[std::size_t(i)], h.format));
    base.set_bias(b);
  } else {
    base.set_bias(state.tensor("bias", 1, d));
  }
}

}  // namespace relora
