#include "relora/layers/lora_linear.hpp"

#include <cmath>

namespace relora {

template <typename T>
LoraLinear<T>::LoraLinear(Backend<T>& backend, const LoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W)
    : backend_(&backend), config_(config), scale_(T(0)) {
  validate(config_);
  scale_ = T(lora_scale(config_));
  allocate_parameters();
  set_W(W);
  if (has_bias()) backend_->fill(b_, T(0));
  reinit();
}

template <typename T>
LoraLinear<T>::LoraLinear(Backend<T>& backend, const LoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W,
                          const Eigen::Ref<const HostVector<T>>& b)
    : LoraLinear(backend, config, W) {
  if (!has_bias()) {
    throw ConfigError("LoraLinear: a bias of " + std::to_string(b.size()) +
                      " values was given but config.bias is none");
  }
  set_b(b);
}

template <typename T>
LoraLinear<T>::LoraLinear(Backend<T>& backend, const LoraConfig& config)
    : backend_(&backend), config_(config), scale_(T(0)) {
  validate(config_);
  scale_ = T(lora_scale(config_));
  allocate_parameters();
  const T bound = T(1) / std::sqrt(T(config_.in_features));
  backend_->random_uniform(next_key(), -bound, bound, W_);
  if (has_bias()) backend_->random_uniform(next_key(), -bound, bound, b_);
  reinit();
}

template <typename T>
void LoraLinear<T>::allocate_parameters() {
  const Index k = config_.in_features, d = config_.out_features, r = config_.rank;
  W_ = backend_->allocate(d, k);
  A_ = backend_->allocate(r, k);
  B_ = backend_->allocate(d, r);
  dA_ = backend_->allocate(r, k);
  dB_ = backend_->allocate(d, r);
  if (has_bias()) {
    b_ = backend_->allocate(1, d);
    db_ = backend_->allocate(1, d);
  }
}

template <typename T>
void LoraLinear<T>::draw_A() {
  if (config_.init == LoraInit::kaiming_uniform) {
    // Kaiming uniform with a = sqrt(5): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / k) = 1 / sqrt(k).
    const T bound = T(1) / std::sqrt(T(config_.in_features));
    backend_->random_uniform(next_key(), -bound, bound, A_);
  } else {
    backend_->random_normal(next_key(), T(0), T(config_.init_std), A_);
  }
}

template <typename T>
void LoraLinear<T>::reinit() {
  draw_A();
  backend_->fill(B_, T(0));
  merged_ = false;
}

template <typename T>
void LoraLinear<T>::set_train_target(TrainTarget target) {
  target_ = target;
  if (target_ == TrainTarget::base && dW_.empty()) {
    dW_ = backend_->allocate(config_.out_features, config_.in_features);
  }
}

template <typename T>
void LoraLinear<T>::resize_batch(Index n) {
  if (n == batch_rows_) return;
  const Index k = config_.in_features, d = config_.out_features, r = config_.rank;
  Y_ = backend_->allocate(n, d);
  U_ = backend_->allocate(n, r);
  dU_ = backend_->allocate(n, r);
  dX_ = Tensor<T>();  // sized by the first backward that needs it: the first layer of a model never does
  dX_is_view_ = false;
  if (config_.dropout > 0) {
    mask_ = backend_->allocate(n, k);
    X_dropped_ = backend_->allocate(n, k);
    dX_lora_ = backend_->allocate(n, k);
  }
  batch_rows_ = n;
}

template <typename T>
void LoraLinear<T>::require_not_merged(const char* operation) const {
  if (merged_) {
    throw ConfigError(std::string("LoraLinear ") + std::to_string(config_.in_features) + " -> " +
                      std::to_string(config_.out_features) + ": cannot " + operation +
                      " while the adapter is merged into W; unmerge() or reinit() first");
  }
}

template <typename T>
void LoraLinear<T>::begin_forward(const Tensor<T>& X) {
  if (X.cols() != config_.in_features || X.rows() <= 0) {
    throw ShapeError("LoraLinear forward: X is " + X.shape() + " but the layer takes [n x " +
                     std::to_string(config_.in_features) + "] with n >= 1");
  }
  resize_batch(X.rows());
  X_ = &X;
  dropout_active_ = training_ && config_.dropout > 0;
  dU_ready_for_ = nullptr;
}

template <typename T>
bool LoraLinear<T>::forward_with_mse(const Tensor<T>& X, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) {
  begin_forward(X);
  if (!target.same_shape(X.rows(), config_.out_features)) {
    throw ShapeError("MseLoss: prediction is " + shape_string(X.rows(), config_.out_features) + " but target is " +
                     target.shape());
  }
  if (!merged_ && !dropout_active_ && backend_->fused_lora_forward_mse(tensors(X), target, U_, Y_, dY, loss, dU_)) {
    dU_ready_for_ = dY.data();
    return true;
  }
  forward(X);
  return false;
}

template <typename T>
const Tensor<T>& LoraLinear<T>::forward(const Tensor<T>& X) {
  begin_forward(X);
  Backend<T>& be = *backend_;
  if (!merged_ && !dropout_active_ && be.fused_lora_forward(tensors(X), U_, Y_)) return Y_;
  // Most of the time goes here and into dY W in backward: the two d x k products.
  be.gemm(Trans::no, Trans::yes, T(1), X, W_, T(0), Y_);
  if (has_bias()) be.add_row_vector(b_, Y_);
  if (merged_) return Y_;

  const Tensor<T>* lora_input = &X;
  if (dropout_active_) {
    be.dropout_mask(next_key(), T(config_.dropout), mask_);
    be.multiply(X, mask_, X_dropped_);
    lora_input = &X_dropped_;
  }
  be.gemm(Trans::no, Trans::yes, T(1), *lora_input, A_, T(0), U_);
  be.gemm(Trans::no, Trans::yes, scale_, U_, B_, T(1), Y_);  // Y += s U B^T, in the GEMM epilogue
  return Y_;
}

template <typename T>
void LoraLinear<T>::backward(const Tensor<T>& dY, bool need_dX) {
  if (!need_dX) return backward_into(dY, nullptr);
  if (dX_is_view_ || !dX_.same_shape(batch_rows_, config_.in_features)) {
    dX_ = backend_->allocate(batch_rows_, config_.in_features);
    dX_is_view_ = false;
  }
  backward_into(dY, &dX_);
}

template <typename T>
void LoraLinear<T>::backward(const Tensor<T>& dY, Tensor<T>& dX) {
  require_shape(dX, batch_rows_, config_.in_features, "LoraLinear backward dX");
  backward_into(dY, &dX);
  if (&dX != &dX_) {
    // A non-owning view, so that dX() shows what was computed.
    dX_ = Tensor<T>(dX.data(), dX.rows(), dX.cols(), dX.device(), [](T*) {});
    dX_is_view_ = true;
  }
}

template <typename T>
void LoraLinear<T>::backward_into(const Tensor<T>& dY, Tensor<T>* dX) {
  if (X_ == nullptr) throw ConfigError("LoraLinear backward: forward was not called");
  require_not_merged("train");
  require_shape(dY, batch_rows_, config_.out_features, "LoraLinear backward dY");
  Backend<T>& be = *backend_;
  const Tensor<T>& lora_input = dropout_active_ ? X_dropped_ : *X_;
  const bool need_dX = dX != nullptr;

  const bool adapter_trains = target_ == TrainTarget::adapter;
  if (adapter_trains && !dropout_active_) {
    Tensor<T>* db = config_.bias == BiasMode::trainable ? &db_ : nullptr;
    const bool dU_ready = dU_ready_for_ != nullptr && dU_ready_for_ == dY.data();
    if (be.fused_lora_backward(tensors(*X_), U_, dY, {&dU_, &dA_, &dB_, db, dX, dU_ready})) return;
  }
  if (adapter_trains) be.gemm(Trans::yes, Trans::no, scale_, dY, U_, T(0), dB_);  // dB = s dY^T U
  if (adapter_trains || need_dX) be.gemm(Trans::no, Trans::no, scale_, dY, B_, T(0), dU_);  // dU = s dY B
  if (adapter_trains) be.gemm(Trans::yes, Trans::no, T(1), dU_, lora_input, T(0), dA_);  // dA = dU^T D(X)
  if (target_ == TrainTarget::base) be.gemm(Trans::yes, Trans::no, T(1), dY, *X_, T(0), dW_);  // dW = dY^T X
  if (config_.bias == BiasMode::trainable) be.column_sums(dY, T(0), db_);

  if (!need_dX) return;
  if (dropout_active_) {
    be.gemm(Trans::no, Trans::no, T(1), dU_, A_, T(0), dX_lora_);
    be.multiply(dX_lora_, mask_, *dX);                       // D'(dU A): the same mask, scale included
    be.gemm(Trans::no, Trans::no, T(1), dY, W_, T(1), *dX);  // dX += dY W
  } else {
    be.gemm(Trans::no, Trans::no, T(1), dY, W_, T(0), *dX);  // dX = dY W
    be.gemm(Trans::no, Trans::no, T(1), dU_, A_, T(1), *dX);  // dX += dU A
  }
}

template <typename T>
LoraLayerTensors<T> LoraLinear<T>::tensors(const Tensor<T>& X) const {
  return {&X, &W_, &A_, &B_, has_bias() ? &b_ : nullptr, scale_};
}

template <typename T>
void LoraLinear<T>::merge() {
  require_not_merged("merge");
  backend_->gemm(Trans::no, Trans::no, scale_, B_, A_, T(1), W_);
  merged_ = true;
}

template <typename T>
void LoraLinear<T>::unmerge() {
  if (!merged_) throw ConfigError("LoraLinear unmerge: the adapter is not merged");
  backend_->gemm(Trans::no, Trans::no, -scale_, B_, A_, T(1), W_);
  merged_ = false;
}

template <typename T>
std::vector<Parameter<T>> LoraLinear<T>::trainable_parameters(const std::string& prefix) {
  std::vector<Parameter<T>> params;
  if (target_ == TrainTarget::adapter) {
    params.push_back({prefix + ".lora_A", ParamRole::lora_A, &A_, &dA_});
    params.push_back({prefix + ".lora_B", ParamRole::lora_B, &B_, &dB_});
  } else {
    params.push_back({prefix + ".weight", ParamRole::base_weight, &W_, &dW_});
  }
  if (config_.bias == BiasMode::trainable) params.push_back({prefix + ".bias", ParamRole::bias, &b_, &db_});
  return params;
}

template <typename T>
void LoraLinear<T>::set_W(const Eigen::Ref<const HostMatrix<T>>& W) {
  upload(*backend_, W, W_, "LoraLinear base weight W (out x in)");
}

template <typename T>
void LoraLinear<T>::set_b(const Eigen::Ref<const HostMatrix<T>>& b) {
  if (!has_bias()) throw ConfigError("LoraLinear set_b: config.bias is none");
  if (b.size() != config_.out_features || (b.rows() != 1 && b.cols() != 1)) {
    throw ShapeError("LoraLinear bias: expected " + std::to_string(config_.out_features) + " values, got " +
                     shape_string(b.rows(), b.cols()));
  }
  const HostMatrix<T> packed = b;  // a row or a column: the same values in the same order
  const HostMatrix<T> row = Eigen::Map<const HostMatrix<T>>(packed.data(), 1, packed.size());
  upload(*backend_, row, b_, "LoraLinear bias b");
}

template <typename T>
void LoraLinear<T>::set_A(const Eigen::Ref<const HostMatrix<T>>& A) {
  upload(*backend_, A, A_, "LoraLinear lora_A (rank x in)");
}

template <typename T>
void LoraLinear<T>::set_B(const Eigen::Ref<const HostMatrix<T>>& B) {
  upload(*backend_, B, B_, "LoraLinear lora_B (out x rank)");
}

template class LoraLinear<float>;
template class LoraLinear<double>;

}  // namespace relora
