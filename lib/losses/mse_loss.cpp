#include "relora/losses/mse_loss.hpp"

#include <type_traits>

#include "training/half_activation_kernels.hpp"

namespace relora {

template <typename T>
MseLoss<T>::MseLoss(Backend<T>& backend) : backend_(&backend), loss_(backend.allocate(1, 1)) {
  backend_->fill(loss_, T(0));
}

template <typename T>
MseLoss<T>::~MseLoss() = default;

template <typename T>
void MseLoss<T>::compute(const Tensor<T>& Y, const Tensor<T>& target) {
  if (!target.same_shape(Y.rows(), Y.cols())) {
    throw ShapeError("MseLoss: prediction is " + Y.shape() + " but target is " + target.shape());
  }
  if (Y.empty()) throw ShapeError("MseLoss: empty prediction " + Y.shape());
  if (!dY_.same_shape(Y.rows(), Y.cols())) dY_ = backend_->allocate(Y.rows(), Y.cols());
  backend_->mse(Y, target, dY_, loss_);
  last_format_ = BasePrecision::fp32;
  dY_current_ = true;
}

template <typename T>
bool MseLoss<T>::compute_half(const HalfTensor& Y, BasePrecision format, const Tensor<T>& target) {
  if constexpr (!std::is_same<T, float>::value) {
    (void)Y, (void)format, (void)target;
    return false;
  } else {
    if (format == BasePrecision::fp32) {
      throw ConfigError("MseLoss: a 16-bit prediction's format must be bf16 or fp16, not fp32");
    }
    if (!target.same_shape(Y.rows(), Y.cols())) {
      throw ShapeError("MseLoss: 16-bit prediction is " + Y.shape() + " but target is " + target.shape());
    }
    if (Y.empty()) throw ShapeError("MseLoss: empty prediction " + Y.shape());
    if (!half_kernels_) half_kernels_ = make_half_activation_kernels(*backend_);
    if (!half_dY_.same_shape(Y.rows(), Y.cols())) half_dY_ = HalfBuffer(*backend_, Y.rows(), Y.cols());
    half_kernels_->mse(Y.data(), target.data(), Y.size(), format, half_dY_.tensor().data(), loss_.data());
    last_format_ = format;
    dY_current_ = false;
    return true;
  }
}

template <typename T>
const HalfTensor* MseLoss<T>::half_gradient(BasePrecision format) const {
  return last_format_ != BasePrecision::fp32 && last_format_ == format ? &half_dY_.tensor() : nullptr;
}

template <typename T>
const Tensor<T>& MseLoss<T>::gradient() const {
  if constexpr (std::is_same<T, float>::value) {
    if (!dY_current_) {
      const HalfTensor& half = half_dY_.tensor();
      if (!dY_.same_shape(half.rows(), half.cols())) dY_ = backend_->allocate(half.rows(), half.cols());
      half_kernels_->widen(half.data(), half.size(), last_format_, dY_.data());
      dY_current_ = true;
    }
  }
  return dY_;
}

template <typename T>
Tensor<T>& MseLoss<T>::gradient_buffer(const Tensor<T>& target) {
  if (target.empty()) throw ShapeError("MseLoss: empty target " + target.shape());
  if (!dY_.same_shape(target.rows(), target.cols())) dY_ = backend_->allocate(target.rows(), target.cols());
  last_format_ = BasePrecision::fp32;
  dY_current_ = true;
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
