#pragma once
// A loss: its value and its gradient with respect to the prediction. The value stays where the
// backend computed it (a 1 x 1 tensor) until value() is asked for, so a training step on the GPU
// never waits for the host. Trainer takes any Loss.
#include "relora/core/backend.hpp"

namespace relora {

template <typename T>
class Loss {
 public:
  virtual ~Loss() = default;
  virtual const char* name() const = 0;

  // The loss of prediction Y against target, and dL/dY (same shape as Y).
  virtual void compute(const Tensor<T>& Y, const Tensor<T>& target) = 0;
  // dL/dY of the last computation (owned by the loss, valid until the next).
  virtual const Tensor<T>& gradient() const = 0;
  // The last value as a 1 x 1 tensor on the backend.
  virtual const Tensor<T>& value_tensor() const = 0;
  // The last value; waits for the backend. NaN or Inf is returned as it is.
  virtual T value() = 0;

  // compute(), then gradient().
  const Tensor<T>& forward_backward(const Tensor<T>& Y, const Tensor<T>& target) {
    compute(Y, target);
    return gradient();
  }
};

}  // namespace relora
