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
// - CudaHalfLoraLinear: the adapter layer on a bf16 base that also takes bf16 activations
//   (Layer::take_half_activations), with every product on tensor cores
//   (cuda_half_lora_linear.cu).
// Each falls back to LoraLinear's products outside its range (dropout, a merged adapter, W
// training, shapes beyond the passes').
#include <memory>

#include "relora/layers/lora_linear.hpp"

namespace relora {

namespace cuda_detail {
class CudaContext;
class HalfGemm;
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

// CudaAdapterLoraLinear<float> on a bf16 base, which also reads and writes bf16 activations
// (a model's set_activation_format(bf16)). Every product then runs on tensor cores: X W^T and
// dY W on the bf16 W; the adapter's, whose fp32 operands (A, B, b, s U, dU) are split into bf16
// terms (hi + mid + lo, half_convert.cuh), each term's product exact and the sum accumulated in fp32:
//
//   forward:   P = X [A_hi; A_mid; A_lo]^T             V = s (P_1 + P_2 + P_3)   (= s U, n x r, fp32)
//              Y = round([V_hi V_hi V_mid 1 1] [B_hi B_mid B_hi b_hi b_mid]^T)  (the adapter's term and b;
//                                                                     the right operand stored transposed)
//              Y = round(f(X W^T + Y))                                          (cuBLASLt's epilogue)
//   backward:  P = dY [B_hi B_mid B_lo]                 dU = s (P_1 + P_2 + P_3)
//              P = dY^T [V_hi V_mid V_lo 1]             dB = P_1 + P_2 + P_3, db = P_4
//              P = [dU_hi dU_mid dU_lo]^T X              dA = P_1 + P_2 + P_3
//              dX = round([dU_hi dU_hi dU_mid] [A_hi; A_mid; A_hi]), dX = round(dY W + dX)
//
// In tf32 mode the four products against X or dY take two terms (hi + mid) instead of three: the
// split operand then keeps 16 significant bits, more than TF32's 11, for two thirds of the work.
// A's, B's and b's splits are one launch, and so are the sums of dB and dA.
//
// In strict mode U, dU, dA, dB and db are as accurate as fp32 products of the same operands; the adapter's term of
// Y with the bias, and of dX (operands split in two, three cross terms kept: 16 significant bits),
// are rounded to bf16 before the base's product adds them, a second rounding beside the model's
// definition (Layer::take_half_activations), and some of cuBLAS's kernels round X W^T (dY W) to
// bf16 before they add that 16-bit term, a third: Y is within u (|X W^T| + |s U B^T + b|) and half
// a spacing of the definition (PEFT on a bf16 base rounds X W^T + b, then the sum). (cuBLASLt adds
// a bias of the result's type only, so b travels with the adapter's term.) Dropout and training W
// (full fine-tuning) take the model's definition literally: X widened, the fp32 step, Y and dX
// rounded.
class CudaHalfLoraLinear final : public CudaAdapterLoraLinear<float> {
 public:
  template <typename... Args>
  explicit CudaHalfLoraLinear(cuda_detail::CudaContext& cuda, Backend<float>& backend, Args&&... args)
      : CudaAdapterLoraLinear<float>(cuda, backend, std::forward<Args>(args)...) {}

  // A bf16 base on CUDA (what the tensor-core products take).
  static bool suits(const LoraConfig& config);
  const char* implementation() const override { return "cuda_half"; }
  std::uint32_t step_signature() const override;

  bool take_half_activations(BasePrecision format) override;
  const HalfTensor& forward_half(const HalfTensor& X) override;
  void backward_half(const HalfTensor& dY, HalfTensor* dX) override;
  HalfTensor& mutable_half_output() override { return Y_half_.tensor(); }

 private:
  void size_half_batch(Index n, int terms);
  // The bf16 terms of A, B, s U and dU in the products against X and dY (bf16 already): three
  // (as accurate as fp32) in strict mode, two (16 significant bits, more than TF32's 11) in tf32.
  int split_terms() const;
  // The fp32 step, for what the tensor-core path does not cover (dropout, W training).
  bool through_fp32() const { return this->dropout_in_use() || this->train_target() == TrainTarget::base; }

  BasePrecision format_ = BasePrecision::fp32;  // fp32: activations not taken
  std::shared_ptr<cuda_detail::HalfGemm> gemm_;
  const HalfTensor* X_half_ = nullptr;  // the forward's input
  bool last_forward_fp32_ = false;      // the last forward_half went through the fp32 step
  Index half_rows_ = -1;
  int half_terms_ = 0;  // split_terms() when the buffers were last laid out
  HalfBuffer Y_half_;
  Tensor<float> products_;     // the split products' fp32 results (P above)
  // Rows of 3r terms and two more columns, padded to 8 values (terms_ld):
  HalfBuffer U_terms_;     // n rows: [V_hi V_mid V_lo 1], written by the forward
  HalfBuffer left_terms_;  // n rows: the forward's [V_hi V_hi V_mid 1 1], the backward's [dU_hi dU_hi dU_mid]
  HalfBuffer dU_terms_;    // n rows: [dU_hi dU_mid dU_lo]
  HalfBuffer B_forward_terms_;   // terms_ld x d: [B_hi B_mid B_hi b_hi b_mid 0]^T (the product then
                                 // takes both operands untransposed, its fastest layout: PERFORMANCE.md)
  HalfBuffer B_backward_terms_;  // d rows: [B_hi B_mid B_lo]
  HalfBuffer A_forward_terms_;   // 3r x k: [A_hi; A_mid; A_lo]
  HalfBuffer A_backward_terms_;  // 3r x k: [A_hi; A_mid; A_hi]
  Tensor<float> wide_X_, wide_dY_, wide_dX_;  // the fp32 step's conversions, sized when it runs
};

// The CUDA sibling that suits `config` on `backend` (null when none does, or when
// backend.underlying() is not relora's CUDA backend), built with LoraLinear's constructor arguments `W`
// (null: drawn) and `b` (null: none).
template <typename T>
std::unique_ptr<LoraLinear<T>> make_cuda_lora_linear(Backend<T>& backend, const LoraConfig& config,
                                                     const Eigen::Ref<const HostMatrix<T>>* W,
                                                     const Eigen::Ref<const HostVector<T>>* b);

}  // namespace relora
