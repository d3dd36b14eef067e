#pragma once
// A LoRA layer of tiny widths on the CPU (k and d up to 16, r up to 8): its forward (with the
// MSE fused in, where it is a model's last layer) and its backward as one feature-major pass each.
// A sibling of LoraLinear, which it falls back to outside its range (dropout, a merged adapter,
// W training, a batch too large to gain); cpu_tiny_lora_linear.cpp says why and how.
#include <cstdint>
#include <cstring>
#include <vector>

#include "relora/layers/lora_linear.hpp"

namespace relora {

// Feature-major copies of the layer's operands: feature f of row i at [f * ld + i], ld = n rounded
// up to whole SIMD registers, the lanes past n zero. Grown to the largest batch seen and never
// shrunk, so that steady steps allocate nothing.
template <typename T>
struct TinyLoraPanels {
  // Which tensor (data, rows, cols) a copy was taken of; data null when it holds none.
  struct Source {
    const T* data = nullptr;
    Index rows = 0, cols = 0;
    bool is(const Tensor<T>& t) const { return data != nullptr && data == t.data() && t.same_shape(rows, cols); }
  };
  // A panel kept from one step to the next: the batch X and the target, which full-batch training
  // passes unchanged every step. `rows` is the row-major copy it was made from, so that it is
  // reused only while the tensor still holds those values (a memcmp, a third of the transpose),
  // however the tensor was written in between.
  struct KeptPanel {
    std::vector<T> panel, rows;
    Source source;
    bool holds(const Tensor<T>& t) const {
      return source.is(t) && std::memcmp(rows.data(), t.data(), sizeof(T) * std::size_t(t.size())) == 0;
    }
    void keep(const Tensor<T>& t) {
      rows.assign(t.data(), t.data() + t.size());  // allocates only while a batch is larger than any before
      source = {t.data(), t.rows(), t.cols()};
    }
  };
  KeptPanel X, target;  // X: the last forward's, which its backward reads rather than X again
  std::vector<T> Ut;    // the last forward pass's U, which its backward reads
  bool U_valid = false;
  // dY and dU = s dY B of the MSE computed in forward_with_loss, which the backward reads instead
  // of transposing dY and computing dU again when it is given that dY; else the backward's own,
  // for its reductions.
  std::vector<T> dYt, dUt;
  Source dY;  // the loss gradient forward_with_loss wrote, while dYt and dUt hold its panels
  std::vector<T> strip;  // one strip of rows of the forward's Y or the backward's dX
};

template <typename T>
class CpuTinyLoraLinear final : public LoraLinear<T> {
 public:
  using LoraLinear<T>::LoraLinear;

  // Whether a layer of this config is within the passes' widths.
  static bool suits(const LoraConfig& config);
  const char* implementation() const override { return "cpu_tiny"; }
  // The strips write Y without an activation: the model's pass applies it.
  bool take_output_activation(Activation) override { return false; }
  // Up to a batch of this work the pass is ahead of the separate products.
  bool fast_path_for(Index rows) const override;

  const Tensor<T>& forward(const Tensor<T>& X) override;
  // With MseLoss: the loss and its gradient computed while each strip of Y is in L1. The backward
  // that follows, given that gradient unchanged, reads its panels.
  void forward_with_loss(const Tensor<T>& X, Loss<T>& loss, const Tensor<T>& target) override;
  void backward(const Tensor<T>& dY, Tensor<T>* dX) override;
  using LoraLinear<T>::backward;

 private:
  // Strip by strip: U, Y and, with `target`, the MSE's dY, dU and squared errors.
  double forward_pass(const Tensor<T>& X, const Tensor<T>* target, T* dY);

  TinyLoraPanels<T> panels_;
};

extern template class CpuTinyLoraLinear<float>;
extern template class CpuTinyLoraLinear<double>;

}  // namespace relora
