#pragma once
// A linear layer with a frozen base weight and a trainable low-rank adapter: the reference
// implementation of Layer, written as the math below and nothing else. Fast paths for
// particular shapes are sibling classes (make_lora_linear picks them), tested against this one.
//
// Letters: n rows of input, k = in_features, d = out_features,
// r = rank, s = scale. X is n x k, W is d x k (frozen), b is d, A is r x k, B is d x r.
//
//   forward:  U = D(X) A^T            (n x r, D = inverted dropout on the LoRA branch)
//             Y = X W^T + b + s U B^T (n x d, the LoRA term accumulated into Y by GEMM)
//   backward: dB = s dY^T U, dU = s dY B, dA = dU^T D(X), db = sum_i dY[i, :],
//             dX = dY W + D'(dU A)
//   full fine-tuning (TrainTarget::base): dW = dY^T X, and no adapter term.
//
// The d x k matrix W + sBA is never formed in forward or backward; merge() adds it into W in
// place, once it has checked that the result is finite. W and b live in a FrozenBase, which
// stores W in fp32, bf16 or fp16 (config.base_precision) and runs X W^T, dY W and the merge.
// Per-batch buffers are sized on the first forward and reused, so a steady training step
// allocates nothing.
#include <cstdint>
#include <string>
#include <vector>

#include "relora/core/host_matrix.hpp"
#include "relora/layers/frozen_base.hpp"
#include "relora/layers/layer.hpp"
#include "relora/layers/lora_config.hpp"

namespace relora {

template <typename T>
class LoraLinear : public Layer<T> {
 public:
  // W: d x k base weight. The bias, when config.bias is not none, starts at zero.
  LoraLinear(Backend<T>& backend, const LoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W);
  LoraLinear(Backend<T>& backend, const LoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W,
             const Eigen::Ref<const HostVector<T>>& b);
  // Base weight (and bias) drawn as nn.Linear does, U(-1/sqrt(k), 1/sqrt(k)), from the layer's seed.
  LoraLinear(Backend<T>& backend, const LoraConfig& config);

  LoraLinear(const LoraLinear&) = delete;
  LoraLinear& operator=(const LoraLinear&) = delete;

  const char* kind() const override { return "lora"; }
  const char* implementation() const override { return "reference"; }
  // Whether this implementation's own path (not LoraLinear's products) runs a plain forward and
  // backward (no dropout, not merged, the adapter training) of a batch of `rows` rows.
  virtual bool fast_path_for(Index rows) const {
    (void)rows;
    return false;
  }
  Index in_features() const override { return config_.in_features; }
  Index out_features() const override { return config_.out_features; }

  const Tensor<T>& forward(const Tensor<T>& X) override;
  void backward(const Tensor<T>& dY, Tensor<T>* dX) override;
  // backward into the layer's own dX buffer (need_dX), or with no dX.
  void backward(const Tensor<T>& dY, bool need_dX) { backward(dY, need_dX ? &own_dX() : nullptr); }

  // Takes ReLU: the base's product applies it (on CUDA in cuBLASLt's epilogue; the CUDA adapter
  // layer in its expand pass), after the adapter's term, which is written first.
  bool take_output_activation(Activation f) override;
  // The activation forward applies to Y (identity unless taken).
  Activation output_activation() const { return output_activation_; }
  const Tensor<T>& output() const override { return Y_; }
  Tensor<T>& mutable_output() override { return Y_; }
  std::vector<Parameter<T>> parameters(const std::string& prefix) override;

  void set_training(bool training) override { training_ = training; }
  bool training() const override { return training_; }
  void set_batch_offset(Index first_row) override;
  void set_train_target(TrainTarget target) override;
  TrainTarget train_target() const override { return target_; }

  // W += s B A; forward then leaves the LoRA branch out. Training a merged layer is refused.
  // Refuses with ConfigError naming the layer, W unchanged, if W + s B A would hold NaN or Inf.
  void merge() override;
  void check_merge() override;
  // W -= s B A, undoing merge() (to fp32 rounding with an fp32 W or master; a 16-bit W without
  // one is rounded again, as merge() rounded it).
  void unmerge() override;
  bool merged() const override { return merged_; }
  // A fresh adapter: A re-drawn from the configured init, B = 0, so the output is unchanged.
  void reinit() override;

  bool replayable() const override { return !dropout_in_use(); }
  std::uint32_t step_signature() const override;

  void save_state(StateDict<T>& state) const override;
  void check_state(const StateDict<T>& state) const override;
  void restore_state(const StateDict<T>& state) override;

  const LoraConfig& config() const { return config_; }
  T scale() const { return scale_; }
  Index rank() const { return config_.rank; }
  bool has_bias() const { return config_.bias != BiasMode::none; }

  // W as fp32 (a 16-bit W's master; ConfigError for a 16-bit W without one: use base()).
  const Tensor<T>& W() const { return base_.weight(); }
  const Tensor<T>& b() const { return base_.bias(); }
  const FrozenBase<T>& base() const { return base_; }
  FrozenBase<T>& base() { return base_; }
  const Tensor<T>& A() const { return A_; }
  const Tensor<T>& B() const { return B_; }
  // dX of the last backward that computed one (possibly a view of the caller's buffer, valid
  // while that buffer is).
  const Tensor<T>& dX() const { return dX_view_.empty() ? dX_ : dX_view_; }
  const Tensor<T>& dW() const { return dW_; }
  const Tensor<T>& db() const { return db_; }
  const Tensor<T>& dA() const { return dA_; }
  const Tensor<T>& dB() const { return dB_; }
  const Tensor<T>& dropout_mask() const { return mask_; }

  // Host-side setters, shapes checked (for loading checkpoints, adapters and base weights).
  void set_W(const Eigen::Ref<const HostMatrix<T>>& W);
  // A 16-bit W's bits, kept as they are (format and shape must be the layer's).
  void set_W_bits(const HalfHostMatrix& W) { base_.set_weight_bits(W); }
  void set_b(const Eigen::Ref<const HostMatrix<T>>& b);  // 1 x d or d x 1
  void set_A(const Eigen::Ref<const HostMatrix<T>>& A);
  void set_B(const Eigen::Ref<const HostMatrix<T>>& B);

  // Random draws so far; each dropout mask and each init of A takes the next stream. Setting it
  // back replays the same masks (finite differences, checkpoints).
  std::uint64_t rng_stream() const { return rng_stream_; }
  void set_rng_stream(std::uint64_t stream) { rng_stream_ = stream; }

 protected:
  // For sibling implementations, which run their own kernels where these hold and this class's
  // products elsewhere.
  //
  // Checks X, sizes the per-batch buffers for its rows, remembers X for the backward and decides
  // whether this forward applies dropout.
  void begin_forward(const Tensor<T>& X);
  // Checks that a forward ran, the adapter is not merged while training it, and dY's and dX's shapes.
  void begin_backward(const Tensor<T>& dY, const Tensor<T>* dX) const;
  // After a backward into dX: dX() shows it.
  void finish_backward(Tensor<T>* dX);
  // A backward of the adapter as the math says: no dropout mask, the adapter (not W) training.
  // Siblings' kernels cover exactly this (and forwards with no mask of an unmerged adapter).
  bool plain_backward() const { return target_ == TrainTarget::adapter && !dropout_active_; }
  bool dropout_in_use() const { return training_ && config_.dropout > 0; }
  bool bias_trains() const { return config_.bias == BiasMode::trainable; }
  Index batch_rows() const { return batch_rows_; }
  // The forward's input, valid between forward and backward.
  const Tensor<T>& input() const { return *X_; }

  Backend<T>* backend_;
  LoraConfig config_;
  T scale_;
  FrozenBase<T> base_;  // W and b
  Tensor<T> A_, B_;
  Tensor<T> dW_, db_, dA_, dB_;
  Tensor<T> U_, Y_, dU_;  // per batch
  Activation output_activation_ = Activation::identity;

 private:
  void allocate_parameters();
  void draw_A();
  void resize_batch(Index n);
  void require_not_merged(const char* operation) const;
  Tensor<T>& own_dX();
  RngKey next_key() { return RngKey{config_.seed, rng_stream_++}; }
  // The key of a dropout mask of the batch: the rows from batch_offset_ of the whole batch's mask.
  RngKey next_mask_key() {
    RngKey key = next_key();
    key.first = std::uint64_t(batch_offset_) * std::uint64_t(config_.in_features);
    return key;
  }

  TrainTarget target_ = TrainTarget::adapter;
  bool training_ = true;
  bool merged_ = false;
  std::uint64_t rng_stream_ = 0;
  Index batch_offset_ = 0;

  Index batch_rows_ = -1;
  const Tensor<T>* X_ = nullptr;
  bool dropout_active_ = false;  // whether the last forward applied a mask
  Tensor<T> mask_, X_dropped_, dX_, dX_lora_;
  Tensor<T> dX_view_;  // a view of the caller's dX after a backward into it
};

extern template class LoraLinear<float>;
extern template class LoraLinear<double>;

}  // namespace relora
