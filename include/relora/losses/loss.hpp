#pragma once
// A loss: its value and its gradient with respect to the prediction. The value stays where the
// backend computed it (a 1 x 1 tensor) until value() is asked for, so a training step on the GPU
// never waits for the host. Trainer takes any Loss; one that also reads a 16-bit prediction
// (compute_half) spares a model with 16-bit activations the fp32 copies of its output and gradient.
#include "relora/core/backend.hpp"
#include "relora/core/half_tensor.hpp"

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

  // With a model whose activations travel in 16 bits (Model::set_activation_format): the loss of
  // the 16-bit prediction Y (bf16 or fp16 bits in `format`) and dL/dY rounded to that format,
  // without an fp32 copy of either; the model's backward starts from that 16-bit gradient
  // (Model::backward(const Loss&)), which it would have rounded to the same bits. Returns false
  // where the loss has no such kernel: the model then widens Y and calls compute(). After a true
  // return, gradient() is the 16-bit gradient widened, on first ask.
  virtual bool compute_half(const HalfTensor& Y, BasePrecision format, const Tensor<T>& target) {
    (void)Y, (void)format, (void)target;
    return false;
  }
  // The 16-bit gradient of the last computation if that was compute_half in `format`, else null.
  virtual const HalfTensor* half_gradient(BasePrecision format) const {
    (void)format;
    return nullptr;
  }

  // compute(), then gradient().
  const Tensor<T>& forward_backward(const Tensor<T>& Y, const Tensor<T>& target) {
    compute(Y, target);
    return gradient();
  }
};

}  // namespace relora
