#include "relora/layers/dora_linear.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "layers/adapter_setup.hpp"
#include "layers/dora_kernels.hpp"
#include "layers/lora_config_state.hpp"
#include "layers/frozen_base_state.hpp"

namespace relora {

void validate(const DoraConfig& c) {
  try {
    validate(c.lora);
  } catch (const ConfigError& e) {
    // LoraConfig's checks, named for this layer.
    std::string message = e.what();
    if (message.rfind("LoraLinear", 0) == 0) message.replace(0, 10, "DoraLinear");
    throw ConfigError(message);
  }
  if (!(c.eps > 0) || !std::isfinite(c.eps)) {
    throw ConfigError("DoraLinear " + std::to_string(c.lora.in_features) + " -> " +
                      std::to_string(c.lora.out_features) + ": eps " + std::to_string(c.eps) +
                      " must be positive and finite");
  }
}

namespace {

const char* gradient_text(DoraGradient g) { return g == DoraGradient::detached ? "detached" : "exact"; }

const DoraConfig& validated(const DoraConfig& config) {
  validate(config);
  return config;
}

std::string layer_name(const DoraConfig& c) {
  return "DoraLinear " + std::to_string(c.lora.in_features) + " -> " + std::to_string(c.lora.out_features);
}

// Views of the part of a tensor that goes with rows [first, first + count) of W: those rows of a
// d x c matrix, or those entries of a 1 x d vector.
template <typename T>
Tensor<T> rows_of(const Tensor<T>& t, Index first, Index count) {
  return Tensor<T>(const_cast<T*>(t.data()) + first * t.cols(), count, t.cols(), t.device(), [](T*) {});
}
template <typename T>
Tensor<T> entries_of(const Tensor<T>& v, Index first, Index count) {
  return Tensor<T>(const_cast<T*>(v.data()) + first, 1, count, v.device(), [](T*) {});
}

}  // namespace

// What every constructor does once the members are set: the eps check, the kernels and the
// parameter tensors.
template <typename T>
void DoraLinear<T>::prepare() {
  if (!(eps_ > 0)) {
    throw ConfigError(name() + ": eps " + std::to_string(config_.eps) + " rounds to 0 in this precision");
  }
  kernels_ = make_dora_kernels<T>(*backend_);
  allocate_parameters();
}

template <typename T>
DoraLinear<T>::DoraLinear(Backend<T>& backend, const DoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W)
    : backend_(&backend),
      config_(validated(config)),
      scale_(T(lora_scale(config_.lora))),
      eps_(T(config_.eps)),
      base_(backend, config_.lora.out_features, config_.lora.in_features, config_.lora.bias,
            config_.lora.base_precision, config_.lora.base_merge, config_.lora.seed, layer_name(config_)) {
  prepare();
  set_W(W);
  if (has_bias()) backend_->fill(base_.bias(), T(0));
  reinit();
}

template <typename T>
DoraLinear<T>::DoraLinear(Backend<T>& backend, const DoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W,
                          const Eigen::Ref<const HostVector<T>>& b)
    : DoraLinear(backend, config, W) {
  if (!has_bias()) {
    throw ConfigError(name() + ": a bias of " + std::to_string(b.size()) + " values was given but config.bias is none");
  }
  set_b(b);
}

template <typename T>
DoraLinear<T>::DoraLinear(Backend<T>& backend, const DoraConfig& config)
    : backend_(&backend),
      config_(validated(config)),
      scale_(T(lora_scale(config_.lora))),
      eps_(T(config_.eps)),
      base_(backend, config_.lora.out_features, config_.lora.in_features, config_.lora.bias,
            config_.lora.base_precision, config_.lora.base_merge, config_.lora.seed, layer_name(config_)) {
  prepare();
  const T bound = T(1) / std::sqrt(T(config_.lora.in_features));
  base_.random_weight(next_key(), -bound, bound);
  refresh_W_norms();
  if (has_bias()) base_.random_bias(next_key(), -bound, bound);
  reinit();
}

template <typename T>
DoraLinear<T>::~DoraLinear() = default;

template <typename T>
std::string DoraLinear<T>::name() const {
  return "DoraLinear " + std::to_string(config_.lora.in_features) + " -> " + std::to_string(config_.lora.out_features);
}

template <typename T>
void DoraLinear<T>::allocate_parameters() {
  const Index k = config_.lora.in_features, d = config_.lora.out_features, r = config_.lora.rank;
  Backend<T>& be = *backend_;
  A_ = be.allocate(r, k);
  B_ = be.allocate(d, r);
  m_ = be.allocate(1, d);
  dA_ = be.allocate(r, k);
  dB_ = be.allocate(d, r);
  dm_ = be.allocate(1, d);
  if (has_bias()) db_ = be.allocate(1, d);
  wsq_ = be.allocate(1, d);
  P_ = be.allocate(d, r);
  G_ = be.allocate(r, r);
  BG_ = be.allocate(d, r);
  n_ = be.allocate(1, d);
  g_ = be.allocate(1, d);
  q_ = be.allocate(1, d);
  Bq_ = be.allocate(d, r);
  H_ = be.allocate(r, r);
  merge_g_ = be.allocate(1, d);
  be.fill(merge_g_, T(1));  // saved with the state: finite before any merge
  Bg_ = be.allocate(d, r);
  recompute_ = be.allocate(1, d);
  be.fill(recompute_, T(0));
}

template <typename T>
void DoraLinear<T>::draw_A() {
  draw_adapter_A(*backend_, config_.lora, next_key(), A_);
}

template <typename T>
void DoraLinear<T>::reinit() {
  draw_A();
  backend_->fill(B_, T(0));
  // m = the row norms of W, rounded as the forward's n is when B = 0, so that g = m / max(n, eps)
  // is exactly 1 wherever the norm is >= eps.
  kernels_->row_norms(wsq_, m_);
  merged_ = false;
}

template <typename T>
void DoraLinear<T>::refresh_W_norms() {
  base_.for_each_row_block([&](Index first, Tensor<T>& rows) {
    Tensor<T> part = entries_of(wsq_, first, rows.rows());
    kernels_->row_squared_norms(rows, part);
  });
}

template <typename T>
void DoraLinear<T>::refresh_factors() {
  Backend<T>& be = *backend_;
  base_.weight_times_transposed(A_, P_);                    // P = W A^T   (d x r)
  be.gemm(Trans::no, Trans::yes, T(1), A_, A_, T(0), G_);   // G = A A^T   (r x r)
  be.gemm(Trans::no, Trans::no, T(1), B_, G_, T(0), BG_);   // B G         (d x r)
  kernels_->norms(wsq_, P_, B_, BG_, m_, scale_, eps_, n_, g_);
}

template <typename T>
void DoraLinear<T>::set_train_target(TrainTarget target) {
  // Leaving full fine-tuning: W changed in the optimizer's last step, after the last forward (a
  // 16-bit W's master did: W is rounded from it first).
  if (target != target_ && target_ == TrainTarget::base) {
    base_.sync_from_master();
    refresh_W_norms();
  }
  target_ = target;
  if (target_ == TrainTarget::base && dW_.empty()) {
    dW_ = backend_->allocate(config_.lora.out_features, config_.lora.in_features);
  }
  if (target_ == TrainTarget::base) base_.trainable_weight();  // a 16-bit W trains through an fp32 master
}

template <typename T>
std::uint32_t DoraLinear<T>::step_signature() const {
  return (target_ == TrainTarget::base ? 1u : 0u) | (training_ ? 2u : 0u) | (merged_ ? 4u : 0u) |
         (dropout_in_use() ? 8u : 0u);
}

template <typename T>
void DoraLinear<T>::resize_batch(Index n) {
  if (n == batch_rows_) return;
  const Index k = config_.lora.in_features, d = config_.lora.out_features, r = config_.lora.rank;
  Backend<T>& be = *backend_;
  Y_ = be.allocate(n, d);
  U_ = be.allocate(n, r);
  dU_ = be.allocate(n, r);
  dX_ = Tensor<T>();  // sized by the first backward that needs it
  dX_view_ = Tensor<T>();
  if (config_.lora.dropout > 0) {
    mask_ = be.allocate(n, k);
    X_dropped_ = be.allocate(n, k);
    E_ = be.allocate(n, k);
    dX_lora_ = be.allocate(n, k);
  }
  // Y = E W^T + Z diag(g) + b: Z cannot be read back from Y. A 16-bit base keeps Z too: the
  // recompute of columns that cannot be read back needs W's rows in fp32 (keeps_Z()).
  if (config_.lora.dropout > 0 || base_.low_precision()) Z_ = be.allocate(n, d);
  batch_rows_ = n;
}

template <typename T>
void DoraLinear<T>::require_not_merged(const char* operation) const {
  if (merged_) {
    throw ConfigError(name() + ": cannot " + operation + " while the adapter is merged into W; unmerge() or reinit() first");
  }
}

template <typename T>
const Tensor<T>& DoraLinear<T>::forward(const Tensor<T>& X) {
  if (X.cols() != config_.lora.in_features || X.rows() <= 0) {
    throw ShapeError(name() + " forward: X is " + X.shape() + " but the layer takes [n x " +
                     std::to_string(config_.lora.in_features) + "] with n >= 1");
  }
  resize_batch(X.rows());
  X_ = &X;
  dropout_active_ = dropout_in_use();
  Backend<T>& be = *backend_;
  if (target_ == TrainTarget::base) base_.sync_from_master();  // the optimizer stepped a 16-bit W's master
  if (merged_) {  // W = diag(g) V already
    base_.forward(X, T(0), output_activation_, Y_);
    return Y_;
  }
  if (target_ == TrainTarget::base) refresh_W_norms();  // W trains: it changed since the last step
  refresh_factors();

  const Tensor<T>* input = &X;
  if (dropout_active_) {
    be.dropout_mask(next_mask_key(), T(config_.lora.dropout), mask_);
    be.multiply(X, mask_, X_dropped_);
    kernels_->difference(X, X_dropped_, E_);
    base_.product(E_, Y_);  // Y = E W^T, the base output PEFT adds
    input = &X_dropped_;
  }
  // Without a mask Z is computed in Y's buffer and scaled in place: the backward reads it back.
  Tensor<T>& Z = keeps_Z() ? Z_ : Y_;
  // Most of the time goes into Z's product with W and the backward's: the adapter's term first,
  // so that the large product adds it in its epilogue (as LoraLinear::forward does).
  be.gemm(Trans::no, Trans::yes, T(1), *input, A_, T(0), U_);  // U = Xd A^T
  be.gemm(Trans::no, Trans::yes, scale_, U_, B_, T(0), Z);    // Z = s U B^T
  base_.product(*input, T(1), Z);                              // Z += Xd W^T
  // Y (+)= Z diag(g) + b, then the ReLU where the layer took it
  kernels_->scale_columns_add(Z, g_, has_bias() ? &base_.bias() : nullptr, dropout_active_,
                              output_activation_ == Activation::relu, Y_);
  return Y_;
}

template <typename T>
bool DoraLinear<T>::take_output_activation(Activation f) {
  if (f != Activation::relu) return false;
  output_activation_ = f;
  return true;
}

template <typename T>
Tensor<T>& DoraLinear<T>::own_dX() {
  if (!dX_.same_shape(batch_rows_, config_.lora.in_features)) {
    dX_ = backend_->allocate(batch_rows_, config_.lora.in_features);
  }
  return dX_;
}

template <typename T>
void DoraLinear<T>::backward(const Tensor<T>& dY_given, Tensor<T>* dX) {
  if (X_ == nullptr) throw ConfigError(name() + " backward: forward was not called");
  require_not_merged("train");
  require_shape(dY_given, batch_rows_, config_.lora.out_features, "DoraLinear backward dY");
  if (dX) require_shape(*dX, batch_rows_, config_.lora.in_features, "DoraLinear backward dX");
  // dY is this backward's scratch (Layer::backward): it becomes dZ = dY diag(g) in place.
  Tensor<T>& dY = const_cast<Tensor<T>&>(dY_given);
  Backend<T>& be = *backend_;
  DoraKernels<T>& kern = *kernels_;
  const Tensor<T>& input = dropout_active_ ? X_dropped_ : *X_;
  const bool adapter = target_ == TrainTarget::adapter;
  Tensor<T>* db = bias_trains() ? &db_ : nullptr;

  // dZ itself is needed by dX = dZ W and dW = dZ^T X: then dY is scaled in place, in the pass that
  // sums dm and db. Otherwise (no dX, or a mask whose backward needs dY W as well) dY is only read,
  // and g goes into the d x r operands: dB = s diag(g) (dY^T U), dU = s dY (diag(g) B).
  const bool dZ_in_dY = !dropout_active_ && (dX != nullptr || !adapter);
  if (keeps_Z()) {
    kern.magnitude_gradient(dY, Z_, g_, n_, eps_, dZ_in_dY, dm_, db);  // Z kept by the forward; dZ in place
  } else {
    kern.magnitude_gradient_from_output(dY, Y_, has_bias() ? &base_.bias() : nullptr, g_, n_, eps_, dZ_in_dY, dm_,
                                        db, recompute_);
    // An fp32 W here: a 16-bit one keeps Z (keeps_Z()).
    kern.recompute_magnitude_gradient(dY, dZ_in_dY, *X_, base_.weight(), U_, B_, scale_, g_, n_, eps_, recompute_,
                                      dm_);
  }
  const Tensor<T>* B_for_dU = &B_;
  if (!dZ_in_dY && (adapter || dX)) {
    kern.scale_rows(g_, B_, false, Bg_);
    B_for_dU = &Bg_;
  }
  if (adapter) {
    be.gemm(Trans::yes, Trans::no, scale_, dY, U_, T(0), dB_);      // dB = s dZ^T U
    if (!dZ_in_dY) kern.scale_rows(g_, dB_, false, dB_);            //    = s diag(g) dY^T U
  }
  if (adapter || dX) be.gemm(Trans::no, Trans::no, scale_, dY, *B_for_dU, T(0), dU_);  // dU = s dZ B
  if (adapter) be.gemm(Trans::yes, Trans::no, T(1), dU_, input, T(0), dA_);           // dA = dU^T Xd
  if (!adapter) be.gemm(Trans::yes, Trans::no, T(1), dY, *X_, T(0), dW_);             // dW = dZ^T X
  if (exact()) {
    // The path through n: q_i = dL/dn_i / n_i, Bq = diag(q) B.
    kern.norm_factors(dm_, m_, n_, eps_, q_);
    kern.scale_rows(q_, B_, false, Bq_);
    if (adapter) {
      kern.add_norm_gradient_B(q_, P_, BG_, scale_, dB_);                // dB += diag(q) (s P + s^2 B G)
      base_.for_each_row_block([&](Index first, Tensor<T>& rows) {      // dA += s Bq^T W
        be.gemm(Trans::yes, Trans::no, scale_, rows_of(Bq_, first, rows.rows()), rows, T(1), dA_);
      });
      be.gemm(Trans::yes, Trans::no, T(1), Bq_, B_, T(0), H_);           // H = Bq^T B
      be.gemm(Trans::no, Trans::no, scale_ * scale_, H_, A_, T(1), dA_);  // dA += s^2 H A
    } else {
      base_.for_each_row_block([&](Index first, Tensor<T>& rows) {  // dW += diag(q) W
        Tensor<T> dW_rows = rows_of(dW_, first, rows.rows());
        kern.scale_rows(entries_of(q_, first, rows.rows()), rows, true, dW_rows);
      });
      be.gemm(Trans::no, Trans::no, scale_, Bq_, A_, T(1), dW_);  // dW += s Bq A
    }
  }

  if (dX) {
    if (dropout_active_) {
      base_.input_gradient(dY, T(0), *dX);                            // dY W
      kern.scale_columns(dY, g_, T(-1), dY);                          // dY is done with: dY diag(g - 1)
      be.gemm(Trans::no, Trans::no, T(1), dU_, A_, T(0), dX_lora_);   // dU A
      base_.input_gradient(dY, T(1), dX_lora_);                       // + dY diag(g - 1) W
      kern.add_masked(mask_, dX_lora_, *dX);                          // dX = dY W + M .* (...)
    } else {
      be.gemm(Trans::no, Trans::no, T(1), dU_, A_, T(0), *dX);   // dX = dU A
      base_.input_gradient(dY, T(1), *dX);                       // dX += dZ W, in its epilogue
    }
  }
  if (dX == nullptr || dX == &dX_) {
    dX_view_ = Tensor<T>();
  } else {
    dX_view_ = Tensor<T>(dX->data(), dX->rows(), dX->cols(), dX->device(), [](T*) {});  // non-owning
  }
}

template <typename T>
void DoraLinear<T>::check_merge() {
  require_not_merged("merge");
  // diag(g) (W + s B A) must be finite before W changes (merge_check.hpp, with F = diag(g)).
  const auto refuse = [&](const std::string& where) {
    throw ConfigError(name() + ": merge refused, diag(g) (W + s B A) would hold NaN or Inf (" + where +
                      "); W is unchanged");
  };
  const auto largest_factor = [&] {
    if (!std::isfinite(double(backend_->max_abs(m_)))) refuse("lora_magnitude_vector holds NaN or Inf");
    refresh_factors();
    const double g = double(backend_->max_abs(g_));
    if (!std::isfinite(g)) refuse("the factors m / max(n, eps) hold NaN or Inf");
    return g;
  };
  base_.check_add_low_rank(scale_, B_, A_, refuse, largest_factor, [&](Index first, Tensor<T>& rows) {
    kernels_->scale_rows(entries_of(g_, first, rows.rows()), rows, false, rows);
  });
}

template <typename T>
void DoraLinear<T>::merge() {
  check_merge();  // also computes g for the current A, B and m
  // W = diag(g) V, V = W + s B A (a block of rows at a time into a 16-bit W)
  base_.add_low_rank(scale_, B_, A_, {}, [&](Index first, Tensor<T>& rows) {
    kernels_->scale_rows(entries_of(g_, first, rows.rows()), rows, false, rows);
  });
  backend_->copy(g_, merge_g_);
  refresh_W_norms();
  merged_ = true;
}

template <typename T>
void DoraLinear<T>::unmerge() {
  if (!merged_) throw ConfigError(name() + " unmerge: the adapter is not merged");
  HostMatrix<T> inverse = to_host(*backend_, merge_g_);
  for (Index i = 0; i < inverse.size(); ++i) {
    const T g = inverse.data()[i];
    if (g == T(0)) {
      throw ConfigError(name() + " unmerge: row " + std::to_string(i) +
                        " was merged with factor g = 0 (m = 0), so its direction is lost; W is unchanged");
    }
    inverse.data()[i] = T(1) / g;
    if (!std::isfinite(inverse.data()[i])) {
      throw ConfigError(name() + " unmerge: row " + std::to_string(i) + "'s merge factor " + std::to_string(g) +
                        " has no finite inverse; W is unchanged");
    }
  }
  upload(*backend_, inverse, q_, name() + " inverse merge factors");
  // W = diag(1/g) W = V, then W = V - s B A
  base_.add_low_rank(-scale_, B_, A_, [&](Index first, Tensor<T>& rows) {
    kernels_->scale_rows(entries_of(q_, first, rows.rows()), rows, false, rows);
  });
  refresh_W_norms();
  merged_ = false;
}

template <typename T>
void DoraLinear<T>::set_batch_offset(Index first_row) {
  if (first_row < 0) throw ConfigError(name() + ": batch offset " + std::to_string(first_row) + " must be >= 0");
  batch_offset_ = first_row;
}

template <typename T>
std::vector<Parameter<T>> DoraLinear<T>::parameters(const std::string& prefix) {
  std::vector<Parameter<T>> params;
  if (target_ == TrainTarget::adapter) {
    params.push_back({prefix + ".lora_A", ParamRole::lora_A, &A_, &dA_});
    params.push_back({prefix + ".lora_B", ParamRole::lora_B, &B_, &dB_});
    params.push_back({prefix + ".lora_magnitude_vector", ParamRole::magnitude, &m_, &dm_});
  } else {
    params.push_back({prefix + ".weight", ParamRole::base_weight, &base_.trainable_weight(), &dW_});
  }
  if (bias_trains()) params.push_back({prefix + ".bias", ParamRole::bias, &base_.bias(), &db_});
  return params;
}

template <typename T>
void DoraLinear<T>::save_state(StateDict<T>& state) const {
  save_base_state(base_, config_.lora, *backend_, state);
  state.set_tensor("lora_A", to_host(*backend_, A_));
  state.set_tensor("lora_B", to_host(*backend_, B_));
  state.set_tensor("lora_magnitude_vector", to_host(*backend_, m_));
  state.set_tensor("merge_factors", to_host(*backend_, merge_g_));
  config_state::save(config_.lora, state);
  state.set("config.gradient", std::string(gradient_text(config_.gradient)));
  state.set("config.eps", config_.eps);
  state.set("merged", merged_);
  state.set("training", training_);
  state.set("rng_stream", std::uint64_t(rng_stream_));
}

template <typename T>
void DoraLinear<T>::check_state(const StateDict<T>& state) const {
  config_state::check(config_.lora, state);
  config_state::same_text(state, "gradient", gradient_text(config_.gradient));
  config_state::same_number(state, "eps", config_.eps);
  const Index k = config_.lora.in_features, d = config_.lora.out_features, r = config_.lora.rank;
  check_base_state(base_, config_.lora, state);
  state.tensor("lora_A", r, k);
  state.tensor("lora_B", d, r);
  state.tensor("lora_magnitude_vector", 1, d);
  state.tensor("merge_factors", 1, d);
  state.boolean("merged");
  state.boolean("training");
  state.unsigned_integer("rng_stream");
}

template <typename T>
void DoraLinear<T>::restore_state(const StateDict<T>& state) {
  check_state(state);
  // Everything checked: from here on only uploads of checked values.
  const Index k = config_.lora.in_features, d = config_.lora.out_features, r = config_.lora.rank;
  restore_base_state(base_, config_.lora, *backend_, state);
  refresh_W_norms();
  set_A(state.tensor("lora_A", r, k));
  set_B(state.tensor("lora_B", d, r));
  set_m(state.tensor("lora_magnitude_vector", 1, d));
  upload(*backend_, state.tensor("merge_factors", 1, d), merge_g_, name() + " merge factors");
  merged_ = state.boolean("merged");
  training_ = state.boolean("training");
  rng_stream_ = state.unsigned_integer("rng_stream");
}

template <typename T>
void DoraLinear<T>::upload_vector(const Eigen::Ref<const HostMatrix<T>>& v, Tensor<T>& dst, const char* what) {
  const HostMatrix<T> row = as_row_vector(v, config_.lora.out_features, name() + " " + what);
  upload(*backend_, row, dst, name() + " " + what);
}

template <typename T>
void DoraLinear<T>::set_W(const Eigen::Ref<const HostMatrix<T>>& W) {
  base_.set_weight(W);
  refresh_W_norms();
}

template <typename T>
void DoraLinear<T>::set_W_bits(const HalfHostMatrix& W) {
  base_.set_weight_bits(W);
  refresh_W_norms();
}

template <typename T>
void DoraLinear<T>::set_b(const Eigen::Ref<const HostMatrix<T>>& b) {
  if (!has_bias()) throw ConfigError(name() + " set_b: config.bias is none");
  base_.set_bias(as_row_vector(b, config_.lora.out_features, name() + " bias b"));
}

template <typename T>
void DoraLinear<T>::set_A(const Eigen::Ref<const HostMatrix<T>>& A) {
  upload(*backend_, A, A_, name() + " lora_A (rank x in)");
}

template <typename T>
void DoraLinear<T>::set_B(const Eigen::Ref<const HostMatrix<T>>& B) {
  upload(*backend_, B, B_, name() + " lora_B (out x rank)");
}

template <typename T>
void DoraLinear<T>::set_m(const Eigen::Ref<const HostMatrix<T>>& m) {
  upload_vector(m, m_, "lora_magnitude_vector m");
}

template class DoraLinear<float>;
template class DoraLinear<double>;

}  // namespace relora
