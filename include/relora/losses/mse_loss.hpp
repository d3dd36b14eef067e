#pragma once
// Mean squared error over all elements: L = mean((Y - target)^2), dL/dY = 2 (Y - target) / size.
#include <memory>

#include "relora/losses/loss.hpp"

namespace relora {

class HalfActivationKernels;  // lib/training/half_activation_kernels.hpp

template <typename T>
class MseLoss final : public Loss<T> {
 public:
  explicit MseLoss(Backend<T>& backend);
  ~MseLoss() override;

  const char* name() const override { return "mse"; }
  void compute(const Tensor<T>& Y, const Tensor<T>& target) override;
  const Tensor<T>& gradient() const override;
  const Tensor<T>& value_tensor() const override { return loss_; }
  T value() override;

  // A 16-bit prediction's loss and gradient in one pass of the device's 16-bit kernels (float
  // losses; a double one returns false). The gradient is the bits the model would round
  // 2 (widen(Y) - target) / size to, and on the CPU the value is compute()'s on widen(Y) exactly.
  bool compute_half(const HalfTensor& Y, BasePrecision format, const Tensor<T>& target) override;
  const HalfTensor* half_gradient(BasePrecision format) const override;

  // The buffers compute() writes, dY sized like target (n x d, n >= 1) and the 1 x 1 value, for
  // a last layer that computes the MSE within its own forward (Layer::forward_with_loss).
  Tensor<T>& gradient_buffer(const Tensor<T>& target);
  Tensor<T>& value_buffer() { return loss_; }

 private:
  Backend<T>* backend_;
  Tensor<T> loss_;
  mutable Tensor<T> dY_;  // compute()'s gradient, or compute_half's widened on first ask
  // compute_half's: the device's 16-bit kernels (made on its first call), its gradient, the
  // format of the last computation (fp32 when it was compute()'s), and whether dY_ holds it yet.
  std::unique_ptr<HalfActivationKernels> half_kernels_;
  HalfBuffer half_dY_;
  BasePrecision last_format_ = BasePrecision::fp32;
  mutable bool dY_current_ = true;
};

extern template class MseLoss<float>;
extern template class MseLoss<double>;

}  // namespace relora
