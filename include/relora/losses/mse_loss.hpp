#pragma once
// Mean squared error over all elements: L = mean((Y - target)^2), dL/dY = 2 (Y - target) / size.
// The value stays where the backend computed it until value() is asked for, so a training step
// on the GPU never waits for the host.
#include "relora/core/backend.hpp"

namespace relora {

template <typename T>
class MseLoss {
 public:
  explicit MseLoss(Backend<T>& backend);

  // Computes the loss and returns dL/dY (owned by this object, valid until the next call).
  const Tensor<T>& forward_backward(const Tensor<T>& Y, const Tensor<T>& target);
  // For a model that computes the loss within its forward (Model::forward_with_mse): the buffers
  // it writes, dY (sized here like target) and the 1 x 1 loss.
  Tensor<T>& gradient_buffer(const Tensor<T>& target);
  Tensor<T>& loss_buffer() { return loss_; }
  // dL/dY of the last computation.
  const Tensor<T>& gradient() const { return dY_; }
  // The last loss; waits for the backend. NaN or Inf is returned as it is.
  T value();
  const Tensor<T>& loss_tensor() const { return loss_; }

 private:
  Backend<T>* backend_;
  Tensor<T> loss_;
  Tensor<T> dY_;
};

extern template class MseLoss<float>;
extern template class MseLoss<double>;

}  // namespace relora
