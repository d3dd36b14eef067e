#pragma once
// The CUDA siblings of LoraLinear, for make_lora_linear. Plain C++ (no CUDA header), so the
// factory can name them; their members are defined in the .cu files beside this one.
//
// - CudaAdapterLoraLinear: a wide layer of small rank. cuBLAS keeps X W^T and dY W; the rank-sized
//   work runs as row, column and reduce passes of ours (cuda_adapter_lora_linear.cu), and a model's
//   last layer trained on the MSE finishes Y, the loss and dU in one pass (cuda_adapter_output.cu).
// - CudaTinyLoraLinear: k, d and r up to 32: forward and backward as one kernel each
//   (cuda_tiny_lora_linear.cu); a batch too large for the one-block backward takes the adapter
//   passes.
// Each falls back to LoraLinear's products outside its range (dropout, a merged adapter, W
// training, shapes beyond the passes').
#include <memory>

#include "relora/layers/lora_linear.hpp"

namespace relora {

namespace cuda_detail {
class CudaContext;
}

template <typename T>
class CudaAdapterLoraLinear : public LoraLinear<T> {
 public:
  // `args` are LoraLinear's constructor arguments after the backend; `cuda` is the backend's CUDA
  // context (cuda_context(backend)).
  template <typename... Args>
  explicit CudaAdapterLoraLinear(cuda_detail::CudaContext& cuda, Backend<T>& backend, Args&&... args)
      : LoraLinear<T>(backend, std::forward<Args>(args)...), cuda_(&cuda) {}

  // Whether the passes take a layer of this config (at some batch size).
  static bool suits(const LoraConfig& config);
  const char* implementation() const override { return "cuda_adapter"; }
  bool fast_path_for(Index rows) const override;

  const Tensor<T>& forward(const Tensor<T>& X) override;
  void forward_with_loss(const Tensor<T>& X, Loss<T>& loss, const Tensor<T>& target) override;
  void backward(const Tensor<T>& dY, Tensor<T>* dX) override;
  using LoraLinear<T>::backward;

 protected:
  cuda_detail::CudaContext& cuda() const { return *cuda_; }
  // The passes for a batch of n rows, or false having queued nothing.
  bool adapter_forward(const Tensor<T>& X);
  bool adapter_backward(const Tensor<T>& dY, Tensor<T>* dX);
  // U = X A^T on the side stream beside Y = X W^T on the main one, joined before what follows.
  void project_beside_product(const Tensor<T>& X);

 private:
  // Makes workspace_ hold at least `bytes`; false when it cannot grow now (while recording).
  bool reserve_workspace(std::size_t bytes);

  cuda_detail::CudaContext* cuda_;
  Tensor<T> workspace_;  // the column pass's partial sums
  // The loss gradient whose s dY B the output pass (forward_with_loss) left in dU_, while it is valid.
  const T* dU_ready_for_ = nullptr;
};

template <typename T>
class CudaTinyLoraLinear final : public CudaAdapterLoraLinear<T> {
 public:
  using CudaAdapterLoraLinear<T>::CudaAdapterLoraLinear;

  static bool suits(const LoraConfig& config);
  const char* implementation() const override { return "cuda_tiny"; }
  // The one-kernel forward writes Y without an activation: the model's pass applies it.
  bool take_output_activation(Activation) override { return false; }
  // The one-kernel forward's rows (the backward takes the adapter passes beyond its own limit).
  bool fast_path_for(Index rows) const override;

  const Tensor<T>& forward(const Tensor<T>& X) override;
  // A tiny layer keeps its one-kernel forward and the separate MSE.
  void forward_with_loss(const Tensor<T>& X, Loss<T>& loss, const Tensor<T>& target) override {
    Layer<T>::forward_with_loss(X, loss, target);
  }
  void backward(const Tensor<T>& dY, Tensor<T>* dX) override;
  using LoraLinear<T>::backward;

 private:
  bool tiny_forward(const Tensor<T>& X);
  bool tiny_backward(const Tensor<T>& dY, Tensor<T>* dX);
};

// The CUDA sibling that suits `config` on `backend` (null when none does, or when
// backend.underlying() is not relora's CUDA backend), built with LoraLinear's constructor arguments `W`
// (null: drawn) and `b` (null: none).
template <typename T>
std::unique_ptr<LoraLinear<T>> make_cuda_lora_linear(Backend<T>& backend, const LoraConfig& config,
                                                     const Eigen::Ref<const HostMatrix<T>>* W,
                                                     const Eigen::Ref<const HostVector<T>>* b);

}  // namespace relora
