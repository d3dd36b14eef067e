#pragma once
// Mean squared error over all elements: L = mean((Y - target)^2), dL/dY = 2 (Y - target) / size.
#include "relora/losses/loss.hpp"

namespace relora {

template <typename T>
class MseLoss final : public Loss<T> {
 public:
  explicit MseLoss(Backend<T>& backend);

  const char* name() const override { return "mse"; }
  void compute(const Tensor<T>& Y, const Tensor<T>& target) override;
  const Tensor<T>& gradient() const override { return dY_; }
  const Tensor<T>& value_tensor() const override { return loss_; }
  T value() override;

  // The buffers compute() writes, dY sized like target (n x d, n >= 1) and the 1 x 1 value, for
  // a last layer that computes the MSE within its own forward (Layer::forward_with_loss).
  Tensor<T>& gradient_buffer(const Tensor<T>& target);
  Tensor<T>& value_buffer() { return loss_; }

 private:
  Backend<T>* backend_;
  Tensor<T> loss_;
  Tensor<T> dY_;
};

extern template class MseLoss<float>;
extern template class MseLoss<double>;

}  // namespace relora
