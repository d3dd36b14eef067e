#pragma once
// A linear layer with a frozen base weight and a trainable low-rank adapter.
//
// Letters, as in shared/DESIGN.md: n rows of input, k = in_features, d = out_features,
// r = rank, s = scale. X is n x k, W is d x k (frozen), b is d, A is r x k, B is d x r.
//
//   forward:  U = D(X) A^T            (n x r, D = inverted dropout on the LoRA branch)
//             Y = X W^T + b + s U B^T (n x d, the LoRA term accumulated into Y by GEMM)
//   backward: dB = s dY^T U, dU = s dY B, dA = dU^T D(X), db = sum_i dY[i, :],
//             dX = dY W + D'(dU A)
//
// The d x k matrix W + sBA is never formed in forward or backward; merge() forms it in place.
// Per-batch buffers are sized on the first forward and reused, so a steady training step
// allocates nothing.
#include <cstdint>
#include <string>
#include <vector>

#include "relora/core/backend.hpp"
#include "relora/core/host_matrix.hpp"
#include "relora/layers/lora_config.hpp"
#include "relora/core/parameter.hpp"

namespace relora {

// What backward computes gradients for: the adapter (A, B), or the base weight W itself
// (full fine-tuning, and ReLoRA's full-rank warm start). A trainable bias trains in both.
enum class TrainTarget { adapter, base };

template <typename T>
class LoraLinear {
 public:
  // W: d x k base weight. The bias, when config.bias is not none, starts at zero.
  LoraLinear(Backend<T>& backend, const LoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W);
  LoraLinear(Backend<T>& backend, const LoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W,
             const Eigen::Ref<const HostVector<T>>& b);
  // Base weight drawn as nn.Linear does, U(-1/sqrt(k), 1/sqrt(k)), from the layer's seed.
  LoraLinear(Backend<T>& backend, const LoraConfig& config);

  LoraLinear(const LoraLinear&) = delete;
  LoraLinear& operator=(const LoraLinear&) = delete;
  LoraLinear(LoraLinear&&) = default;

  // Y (n x d). X must stay alive and unchanged until backward.
  const Tensor<T>& forward(const Tensor<T>& X);
  // forward(X) for a model's last layer trained on the MSE against target (n x d): where the
  // backend can fuse them (Backend::fused_lora_forward_mse), the same pass also writes the loss
  // (1 x 1) and its gradient dY (n x d) and takes the first product of the backward, and the
  // call returns true; a backward on that dY, unchanged, then skips that product. False: only
  // forward ran, and dY and loss are untouched.
  bool forward_with_mse(const Tensor<T>& X, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss);
  // Gradients of the parameters that train (see TrainTarget), and dX when need_dX (into the
  // layer's own dX buffer).
  void backward(const Tensor<T>& dY, bool need_dX);
  // The same, with dX (n x k) written into the caller's tensor, which may be a view of a buffer
  // the caller reuses (Model does); dX() then views it until the next backward.
  void backward(const Tensor<T>& dY, Tensor<T>& dX);

  // W += s B A; forward then leaves the LoRA branch out. Training a merged layer is refused.
  void merge();
  // W -= s B A, undoing merge().
  void unmerge();
  // A fresh adapter: A re-drawn from the configured init, B = 0, so the output is unchanged
  // (after a merge, the old adapter lives on in W).
  void reinit();

  void set_training(bool training) { training_ = training; }  // dropout only while training
  bool training() const { return training_; }
  void set_train_target(TrainTarget target);
  TrainTarget train_target() const { return target_; }
  bool merged() const { return merged_; }

  // The parameters that train now, named prefix + ".lora_A" etc.
  std::vector<Parameter<T>> trainable_parameters(const std::string& prefix);

  const LoraConfig& config() const { return config_; }
  T scale() const { return scale_; }
  Index rank() const { return config_.rank; }
  Index in_features() const { return config_.in_features; }
  Index out_features() const { return config_.out_features; }
  bool has_bias() const { return config_.bias != BiasMode::none; }

  const Tensor<T>& W() const { return W_; }
  const Tensor<T>& b() const { return b_; }
  const Tensor<T>& A() const { return A_; }
  const Tensor<T>& B() const { return B_; }
  const Tensor<T>& output() const { return Y_; }
  // Y's buffer, for a Model that applies ReLU in place and reuses the buffer in backward once
  // nothing needs Y any more (the next forward rewrites it).
  Tensor<T>& mutable_output() { return Y_; }
  // dX of the last backward that computed one (in a Model: a buffer the model reuses, valid
  // until the model's next backward or forward).
  const Tensor<T>& dX() const { return dX_; }
  const Tensor<T>& dW() const { return dW_; }
  const Tensor<T>& db() const { return db_; }
  const Tensor<T>& dA() const { return dA_; }
  const Tensor<T>& dB() const { return dB_; }
  const Tensor<T>& dropout_mask() const { return mask_; }

  // Host-side setters, shapes checked (for loading checkpoints, adapters and base weights).
  void set_W(const Eigen::Ref<const HostMatrix<T>>& W);
  void set_b(const Eigen::Ref<const HostMatrix<T>>& b);  // 1 x d or d x 1
  void set_A(const Eigen::Ref<const HostMatrix<T>>& A);
  void set_B(const Eigen::Ref<const HostMatrix<T>>& B);
  // Merged state is part of the layer's state in a checkpoint.
  void set_merged_flag(bool merged) { merged_ = merged; }

  // Random draws so far; each dropout mask and each init of A takes the next stream. Setting it
  // back replays the same masks (finite differences, checkpoints).
  std::uint64_t rng_stream() const { return rng_stream_; }
  void set_rng_stream(std::uint64_t stream) { rng_stream_ = stream; }

 private:
  void allocate_parameters();
  void draw_A();
  void resize_batch(Index n);
  void require_not_merged(const char* operation) const;
  void begin_forward(const Tensor<T>& X);
  void backward_into(const Tensor<T>& dY, Tensor<T>* dX);
  LoraLayerTensors<T> tensors(const Tensor<T>& X) const;  // for the backend's fused small-layer path
  RngKey next_key() { return RngKey{config_.seed, rng_stream_++}; }

  Backend<T>* backend_;
  LoraConfig config_;
  T scale_;
  TrainTarget target_ = TrainTarget::adapter;
  bool training_ = true;
  bool merged_ = false;
  std::uint64_t rng_stream_ = 0;

  Tensor<T> W_, b_, A_, B_;
  Tensor<T> dW_, db_, dA_, dB_;
  // per-batch buffers, sized on the first forward for n rows
  Index batch_rows_ = -1;
  const Tensor<T>* X_ = nullptr;
  bool dropout_active_ = false;  // whether the last forward applied a mask
  const T* dU_ready_for_ = nullptr;  // the dY whose s dY B the last forward left in dU_, if any
  Tensor<T> mask_, X_dropped_, U_, Y_, dU_, dX_, dX_lora_;
  bool dX_is_view_ = false;  // dX_ views the caller's buffer (backward into a given dX)
};

extern template class LoraLinear<float>;
extern template class LoraLinear<double>;

}  // namespace relora
