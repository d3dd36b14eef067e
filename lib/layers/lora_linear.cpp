#include "relora/layers/lora_linear.hpp"

#include "layers/adapter_setup.hpp"
#include "layers/lora_config_state.hpp"
#include "layers/frozen_base_state.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace relora {
namespace {

const LoraConfig& validated(const LoraConfig& config) {
  validate(config);
  return config;
}

std::string layer_name(const LoraConfig& c) {
  return "LoraLinear " + std::to_string(c.in_features) + " -> " + std::to_string(c.out_features);
}

}  // namespace

template <typename T>
LoraLinear<T>::LoraLinear(Backend<T>& backend, const LoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W)
    : backend_(&backend),
      config_(validated(config)),
      scale_(T(lora_scale(config_))),
      base_(backend, config_.out_features, config_.in_features, config_.bias, config_.base_precision,
            config_.base_merge, config_.seed, layer_name(config_)) {
  allocate_parameters();
  set_W(W);
  if (has_bias()) backend_->fill(base_.bias(), T(0));
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
    : backend_(&backend),
      config_(validated(config)),
      scale_(T(lora_scale(config_))),
      base_(backend, config_.out_features, config_.in_features, config_.bias, config_.base_precision,
            config_.base_merge, config_.seed, layer_name(config_)) {
  allocate_parameters();
  const T bound = T(1) / std::sqrt(T(config_.in_features));
  base_.random_weight(next_key(), -bound, bound);
  if (has_bias()) base_.random_bias(next_key(), -bound, bound);
  reinit();
}

template <typename T>
void LoraLinear<T>::allocate_parameters() {
  const Index k = config_.in_features, d = config_.out_features, r = config_.rank;
  A_ = backend_->allocate(r, k);
  B_ = backend_->allocate(d, r);
  dA_ = backend_->allocate(r, k);
  dB_ = backend_->allocate(d, r);
  if (has_bias()) db_ = backend_->allocate(1, d);
}

template <typename T>
void LoraLinear<T>::draw_A() {
  draw_adapter_A(*backend_, config_, next_key(), A_);
}

template <typename T>
void LoraLinear<T>::reinit() {
  draw_A();
  backend_->fill(B_, T(0));
  merged_ = false;
}

template <typename T>
void LoraLinear<T>::set_train_target(TrainTarget target) {
  // Leaving full fine-tuning: the optimizer's last step changed a 16-bit W's master after the last forward.
  if (target != target_ && target_ == TrainTarget::base) base_.sync_from_master();
  target_ = target;
  if (target_ == TrainTarget::base && dW_.empty()) {
    dW_ = backend_->allocate(config_.out_features, config_.in_features);
  }
  if (target_ == TrainTarget::base) base_.trainable_weight();  // a 16-bit W trains through an fp32 master
}

template <typename T>
std::uint32_t LoraLinear<T>::step_signature() const {
  return (target_ == TrainTarget::base ? 1u : 0u) | (training_ ? 2u : 0u) | (merged_ ? 4u : 0u) |
         (dropout_in_use() ? 8u : 0u);
}

template <typename T>
void LoraLinear<T>::resize_batch(Index n) {
  if (n == batch_rows_) return;
  const Index k = config_.in_features, d = config_.out_features, r = config_.rank;
  Y_ = backend_->allocate(n, d);
  U_ = backend_->allocate(n, r);
  dU_ = backend_->allocate(n, r);
  dX_ = Tensor<T>();  // sized by the first backward that needs it: the first layer of a model never does
  dX_view_ = Tensor<T>();
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
  dropout_active_ = dropout_in_use();
}

template <typename T>
const Tensor<T>& LoraLinear<T>::forward(const Tensor<T>& X) {
  begin_forward(X);
  Backend<T>& be = *backend_;
  if (target_ == TrainTarget::base) base_.sync_from_master();  // the optimizer stepped the master
  if (merged_) {
    base_.forward(X, T(0), output_activation_, Y_);  // Y = f(X W^T + b)
    return Y_;
  }
  const Tensor<T>* lora_input = &X;
  if (dropout_active_) {
    be.dropout_mask(next_mask_key(), T(config_.dropout), mask_);
    be.multiply(X, mask_, X_dropped_);
    lora_input = &X_dropped_;
  }
  // The adapter's term first, then the base product onto it: most of the time goes into X W^T
  // (and dY W in backward), and a product that large adds what Y holds in its epilogue at little
  // cost, where adding the rank-r term afterwards would read and write Y once more.
  be.gemm(Trans::no, Trans::yes, T(1), *lora_input, A_, T(0), U_);  // U = D(X) A^T
  be.gemm(Trans::no, Trans::yes, scale_, U_, B_, T(0), Y_);          // Y = s U B^T
  base_.forward(X, T(1), output_activation_, Y_);                    // Y = f(Y + X W^T + b)
  return Y_;
}

template <typename T>
bool LoraLinear<T>::take_output_activation(Activation f) {
  if (f != Activation::relu) return false;
  output_activation_ = f;
  return true;
}

template <typename T>
Tensor<T>& LoraLinear<T>::own_dX() {
  if (!dX_.same_shape(batch_rows_, config_.in_features)) dX_ = backend_->allocate(batch_rows_, config_.in_features);
  return dX_;
}

template <typename T>
void LoraLinear<T>::begin_backward(const Tensor<T>& dY, const Tensor<T>* dX) const {
  if (X_ == nullptr) throw ConfigError("LoraLinear backward: forward was not called");
  require_not_merged("train");
  require_shape(dY, batch_rows_, config_.out_features, "LoraLinear backward dY");
  if (dX) require_shape(*dX, batch_rows_, config_.in_features, "LoraLinear backward dX");
}

template <typename T>
void LoraLinear<T>::finish_backward(Tensor<T>* dX) {
  if (dX == nullptr || dX == &dX_) {
    dX_view_ = Tensor<T>();
  } else {
    dX_view_ = Tensor<T>(dX->data(), dX->rows(), dX->cols(), dX->device(), [](T*) {});  // non-owning
  }
}

template <typename T>
void LoraLinear<T>::backward(const Tensor<T>& dY, Tensor<T>* dX) {
  begin_backward(dY, dX);
  Backend<T>& be = *backend_;
  const Tensor<T>& lora_input = dropout_active_ ? X_dropped_ : *X_;
  const bool adapter_trains = target_ == TrainTarget::adapter;
  if (adapter_trains) be.gemm(Trans::yes, Trans::no, scale_, dY, U_, T(0), dB_);  // dB = s dY^T U
  if (adapter_trains || dX) be.gemm(Trans::no, Trans::no, scale_, dY, B_, T(0), dU_);  // dU = s dY B
  if (adapter_trains) be.gemm(Trans::yes, Trans::no, T(1), dU_, lora_input, T(0), dA_);  // dA = dU^T D(X)
  if (!adapter_trains) be.gemm(Trans::yes, Trans::no, T(1), dY, *X_, T(0), dW_);  // dW = dY^T X
  if (bias_trains()) be.column_sums(dY, T(0), db_);

  if (dX) {
    if (dropout_active_) {
      be.gemm(Trans::no, Trans::no, T(1), dU_, A_, T(0), dX_lora_);
      be.multiply(dX_lora_, mask_, *dX);                       // D'(dU A): the same mask, scale included
      base_.input_gradient(dY, T(1), *dX);  // dX += dY W
    } else {
      be.gemm(Trans::no, Trans::no, T(1), dU_, A_, T(0), *dX);  // dX = dU A
      base_.input_gradient(dY, T(1), *dX);  // dX += dY W, in the large product's epilogue
    }
  }
  finish_backward(dX);
}

template <typename T>
void LoraLinear<T>::merge() {
  check_merge();
  base_.add_low_rank(scale_, B_, A_);
  merged_ = true;
}

template <typename T>
void LoraLinear<T>::check_merge() {
  require_not_merged("merge");
  // A NaN, an Inf or an overflow in the adapter must not reach W (merge_check.hpp).
  const auto refuse = [&](const std::string& where) {
    throw ConfigError("LoraLinear " + std::to_string(config_.in_features) + " -> " +
                      std::to_string(config_.out_features) + ": merge refused, W + s B A would hold NaN or Inf (" +
                      where + "); W is unchanged");
  };
  base_.check_add_low_rank(scale_, B_, A_, refuse);
}

template <typename T>
void LoraLinear<T>::unmerge() {
  if (!merged_) throw ConfigError("LoraLinear unmerge: the adapter is not merged");
  base_.add_low_rank(-scale_, B_, A_);  // exact to fp32 rounding with an fp32 W or master
  merged_ = false;
}

template <typename T>
void LoraLinear<T>::set_batch_offset(Index first_row) {
  if (first_row < 0) {
    throw ConfigError("LoraLinear " + std::to_string(config_.in_features) + " -> " +
                      std::to_string(config_.out_features) + ": batch offset " + std::to_string(first_row) +
                      " must be >= 0");
  }
  batch_offset_ = first_row;
}

template <typename T>
std::vector<Parameter<T>> LoraLinear<T>::parameters(const std::string& prefix) {
  std::vector<Parameter<T>> params;
  if (target_ == TrainTarget::adapter) {
    params.push_back({prefix + ".lora_A", ParamRole::lora_A, &A_, &dA_});
    params.push_back({prefix + ".lora_B", ParamRole::lora_B, &B_, &dB_});
  } else {
    params.push_back({prefix + ".weight", ParamRole::base_weight, &base_.trainable_weight(), &dW_});
  }
  if (bias_trains()) params.push_back({prefix + ".bias", ParamRole::bias, &base_.bias(), &db_});
  return params;
}

template <typename T>
void LoraLinear<T>::save_state(StateDict<T>& state) const {
  save_base_state(base_, config_, *backend_, state);
  state.set_tensor("lora_A", to_host(*backend_, A_));
  state.set_tensor("lora_B", to_host(*backend_, B_));
  config_state::save(config_, state);
  state.set("merged", merged_);
  state.set("training", training_);
  state.set("rng_stream", std::uint64_t(rng_stream_));
}

template <typename T>
void LoraLinear<T>::check_state(const StateDict<T>& state) const {
  config_state::check(config_, state);
  const Index k = config_.in_features, d = config_.out_features, r = config_.rank;
  check_base_state(base_, config_, state);
  state.tensor("lora_A", r, k);
  state.tensor("lora_B", d, r);
  state.boolean("merged");
  state.boolean("training");
  state.unsigned_integer("rng_stream");
}

template <typename T>
void LoraLinear<T>::restore_state(const StateDict<T>& state) {
  check_state(state);
  // Everything checked: from here on only uploads of checked values.
  const Index k = config_.in_features, d = config_.out_features, r = config_.rank;
  restore_base_state(base_, config_, *backend_, state);
  set_A(state.tensor("lora_A", r, k));
  set_B(state.tensor("lora_B", d, r));
  merged_ = state.boolean("merged");
  training_ = state.boolean("training");
  rng_stream_ = state.unsigned_integer("rng_stream");
}

template <typename T>
void LoraLinear<T>::set_W(const Eigen::Ref<const HostMatrix<T>>& W) {
  base_.set_weight(W);
}

template <typename T>
void LoraLinear<T>::set_b(const Eigen::Ref<const HostMatrix<T>>& b) {
  if (!has_bias()) throw ConfigError("LoraLinear set_b: config.bias is none");
  base_.set_bias(as_row_vector(b, config_.out_features, "LoraLinear bias"));
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
