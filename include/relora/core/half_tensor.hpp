#pragma once
// 16-bit values (bf16 or fp16 bits, half_precision.hpp) in a backend's memory: the activations
// between layers of a Model whose activations travel in 16 bits (Model::set_activation_format).
// The format travels beside the tensor, as it does for a 16-bit base (FrozenBase).
#include <cstdint>

#include "relora/core/backend.hpp"
#include "relora/core/half_precision.hpp"

namespace relora {

using HalfTensor = Tensor<std::uint16_t>;

// A rows x cols HalfTensor allocated through a float backend, which allocates (and counts, for a
// recorded step's check) floats: the storage is ceil(rows cols / 2) floats and tensor() views it
// as 16-bit values. Moving keeps the view valid (the storage does not move).
class HalfBuffer {
 public:
  HalfBuffer() = default;
  HalfBuffer(Backend<float>& backend, Index rows, Index cols)
      : storage_(backend.allocate(1, (rows * cols + 1) / 2)),
        view_(reinterpret_cast<std::uint16_t*>(storage_.data()), rows, cols, storage_.device(),
              [](std::uint16_t*) {}) {}

  HalfTensor& tensor() { return view_; }
  const HalfTensor& tensor() const { return view_; }
  bool same_shape(Index rows, Index cols) const { return view_.same_shape(rows, cols); }
  bool empty() const { return view_.empty(); }

 private:
  Tensor<float> storage_;
  HalfTensor view_;
};

}  // namespace relora
