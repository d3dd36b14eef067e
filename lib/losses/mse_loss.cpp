#include "relora/losses/mse_loss.hpp"

namespace relora {

template <typename T>
MseLoss<T>::MseLoss(Backend<T>& backend) : backend_(&backend), loss_(backend.allocate(1, 1)) {
  backend_->fill(loss_, T(0));
}

template <typename T>
void MseLoss<T>::compute(const Tensor<T>& Y, const Tensor<T>& target) {
  if (!target.same_shape(Y.rows(), Y.cols())) {
    throw ShapeError("MseLoss: prediction is " + Y.shape() + " but target is " + target.shape());
  }
  if (Y.empty()) throw ShapeError("MseLoss: empty prediction " + Y.shape());
  if (!dY_.same_shape(Y.rows(), Y.cols())) dY_ = backend_->allocate(Y.rows(), Y.cols());
  backend_->mse(Y, target, dY_, loss_);
}

template <typename T>
Tensor<T>& MseLoss<T>::gradient_buffer(const Tensor<T>& target) {
  if (target.empty()) throw ShapeError("MseLoss: empty target " + target.shape());
  if (!dY_.same_shape(target.rows(), target.cols())) dY_ = backend_->allocate(target.rows(), target.cols());
  return dY_;
}

template <typename T>
T MseLoss<T>::value() {
  T value = T(0);
  backend_->download(loss_, &value);
  return value;
}

template class MseLoss<float>;
template class MseLoss<double>;

}  // namespace relora
