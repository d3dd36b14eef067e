#include "relora/layers/frozen_base.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "layers/frozen_base_kernels.hpp"
#include "layers/merge_check.hpp"

namespace relora {
namespace {

// The rounding draws of a base get a seed of their own, so they never repeat the layer's draws of
// A and dropout masks (which use the layer's seed directly).
constexpr std::uint64_t kRoundingSeedSalt = 0xB16B00B5F00DCAFEull;

// Rows of W handled at once by a merge without a master: 16 MiB of fp32 scratch at most.
Index merge_block_rows(Index d, Index k) {
  return std::max<Index>(1, std::min<Index>(d, (Index(1) << 22) / std::max<Index>(k, 1)));
}

// A view of rows [first, first + rows) of a row-major tensor.
template <typename T>
Tensor<T> row_view(const Tensor<T>& t, Index first, Index rows) {
  return Tensor<T>(const_cast<T*>(t.data()) + first * t.cols(), rows, t.cols(), t.device(), [](T*) {});
}

}  // namespace

template <typename T>
FrozenBase<T>::FrozenBase(Backend<T>& backend, Index out_features, Index in_features, BiasMode bias,
                          BasePrecision precision, BaseMerge merge, std::uint64_t seed, std::string name)
    : backend_(&backend),
      d_(out_features),
      k_(in_features),
      bias_(bias),
      precision_(precision),
      merge_(merge),
      rounding_key_{splitmix64(seed) ^ kRoundingSeedSalt, 0},
      name_(std::move(name)) {
  if (!low_precision()) {
    W_ = backend_->allocate(d_, k_);
  } else {
    if (!std::is_same<T, float>::value) {
      throw ConfigError(name_ + ": a " + precision_name(precision_) +
                        " base needs a float layer (fp32 adapters); this layer computes in double");
    }
    // Two 16-bit values per float of storage: the backend allocates (and counts) it like any tensor.
    W_ = backend_->allocate(1, (d_ * k_ + 1) / 2);
    if constexpr (std::is_same<T, float>::value) kernels_ = make_frozen_base_kernels(*backend_);
    if (merge_ == BaseMerge::fp32_master) master_ = backend_->allocate(d_, k_);
  }
  if (has_bias()) b_ = backend_->allocate(1, d_);
}

template <typename T>
FrozenBase<T>::~FrozenBase() = default;

template <typename T>
std::uint16_t* FrozenBase<T>::bits() {
  return reinterpret_cast<std::uint16_t*>(W_.data());
}

template <typename T>
const std::uint16_t* FrozenBase<T>::bits() const {
  return reinterpret_cast<const std::uint16_t*>(W_.data());
}

template <typename T>
void FrozenBase<T>::require_half(const char* operation) const {
  if (!low_precision()) throw ConfigError(name_ + ": " + operation + " needs a bf16 or fp16 base; W is fp32");
}

template <typename T>
void FrozenBase<T>::product(const Tensor<T>& X, Tensor<T>& Y) {
  product(X, T(0), Y);
}

template <typename T>
void FrozenBase<T>::product(const Tensor<T>& X, T beta, Tensor<T>& Y) {
  multiply(X, beta, false, Activation::identity, Y);
}

template <typename T>
void FrozenBase<T>::forward(const Tensor<T>& X, Tensor<T>& Y) {
  forward(X, T(0), Y);
}

template <typename T>
void FrozenBase<T>::forward(const Tensor<T>& X, T beta, Tensor<T>& Y) {
  multiply(X, beta, has_bias(), Activation::identity, Y);
}

template <typename T>
void FrozenBase<T>::forward(const Tensor<T>& X, T beta, Activation f, Tensor<T>& Y) {
  // The layer's name only for the message: a steady step builds no string.
  if (!applies_in_place(f)) require_in_place_activation(f, (name_ + " forward").c_str());
  multiply(X, beta, has_bias(), f, Y);
}

template <typename T>
void FrozenBase<T>::multiply(const Tensor<T>& X, T beta, bool with_bias, Activation f, Tensor<T>& Y) {
  if (!low_precision()) {
    if (with_bias || f != Activation::identity) {
      backend_->gemm_bias_activation(Trans::no, Trans::yes, T(1), X, W_, beta, with_bias ? &b_ : nullptr, f, Y);
    } else {
      backend_->gemm(Trans::no, Trans::yes, T(1), X, W_, beta, Y);
    }
  } else if constexpr (std::is_same<T, float>::value) {
    require_shape(X, X.rows(), k_, "FrozenBase product X");
    require_shape(Y, X.rows(), d_, "FrozenBase product Y");
    kernels_->forward_product(X, bits(), precision_, with_bias ? b_.data() : nullptr, beta, f == Activation::relu, Y);
  }
}

template <typename T>
void FrozenBase<T>::input_gradient(const Tensor<T>& dY, T beta, Tensor<T>& dX) {
  if (!low_precision()) {
    backend_->gemm(Trans::no, Trans::no, T(1), dY, W_, beta, dX);
  } else if constexpr (std::is_same<T, float>::value) {
    require_shape(dY, dY.rows(), d_, "FrozenBase input gradient dY");
    require_shape(dX, dY.rows(), k_, "FrozenBase input gradient dX");
    kernels_->input_gradient_product(dY, bits(), precision_, beta, dX);
  }
}

template <typename T>
bool FrozenBase<T>::has_half_activation_products(BasePrecision format) const {
  return low_precision() && format == precision_ && kernels_ && kernels_->has_half_activation_products();
}

template <typename T>
void FrozenBase<T>::forward_half(const HalfTensor& X, float beta, Activation f, HalfTensor& Y) {
  if (!has_half_activation_products(precision_)) {
    throw ConfigError(name_ + ": no product on 16-bit activations for a " + precision_name(precision_) + " base on " +
                      backend_->description());
  }
  if (!applies_in_place(f)) require_in_place_activation(f, (name_ + " forward").c_str());
  require_shape(X, X.rows(), k_, "FrozenBase product X (16-bit)");
  require_shape(Y, X.rows(), d_, "FrozenBase product Y (16-bit)");
  kernels_->forward_product_half(X, bits(), precision_, beta, f == Activation::relu, Y);
}

template <typename T>
void FrozenBase<T>::input_gradient_half(const HalfTensor& dY, float beta, HalfTensor& dX) {
  if (!has_half_activation_products(precision_)) {
    throw ConfigError(name_ + ": no product on 16-bit activations for a " + precision_name(precision_) + " base on " +
                      backend_->description());
  }
  require_shape(dY, dY.rows(), d_, "FrozenBase input gradient dY (16-bit)");
  require_shape(dX, dY.rows(), k_, "FrozenBase input gradient dX (16-bit)");
  kernels_->input_gradient_product_half(dY, bits(), precision_, beta, dX);
}

template <typename T>
Tensor<T>& FrozenBase<T>::weight() {
  return const_cast<Tensor<T>&>(static_cast<const FrozenBase&>(*this).weight());
}

template <typename T>
const Tensor<T>& FrozenBase<T>::weight() const {
  if (!low_precision()) return W_;
  if (has_master()) return master_;
  throw ConfigError(name_ + ": W is stored in " + precision_name(precision_) +
                    " with no fp32 master; read it with weight_host() or weight_bits()");
}

template <typename T>
Tensor<T>& FrozenBase<T>::trainable_weight() {
  if (!low_precision()) return W_;
  if (!has_master()) {
    master_ = backend_->allocate(d_, k_);
    if constexpr (std::is_same<T, float>::value) kernels_->widen(bits(), d_ * k_, precision_, master_.data());
  }
  return master_;
}

template <typename T>
void FrozenBase<T>::sync_from_master() {
  if (low_precision() && has_master()) round_into_weight(master_, HalfRounding::nearest);
}

template <typename T>
void FrozenBase<T>::round_into_weight(const Tensor<T>& src, HalfRounding mode) {
  if constexpr (std::is_same<T, float>::value) {
    const RngKey key{rounding_key_.seed, rounding_stream_};
    if (mode == HalfRounding::stochastic) ++rounding_stream_;
    kernels_->round(src.data(), d_ * k_, 0, precision_, mode, key, bits());
  }
}

template <typename T>
void FrozenBase<T>::check_add_low_rank(T s, const Tensor<T>& B, const Tensor<T>& A,
                                       const std::function<void(const std::string&)>& refuse,
                                       const std::function<double()>& row_factor, const RowBlock& finish) {
  const auto factor = [&] { return row_factor ? row_factor() : 1.0; };
  const auto apply = [&](Index first, Tensor<T>& rows) {
    if (finish) finish(first, rows);
  };
  // An fp32 W, or the master a 16-bit W is rounded from. (A 16-bit W saturates at its format's
  // largest value, so fp32 finiteness is all a merge needs.)
  if (!low_precision() || has_master()) {
    check_merge_finite(*backend_, low_precision() ? master_ : W_, s, B, A, refuse, factor, apply);
    return;
  }
  if constexpr (std::is_same<T, float>::value) {
    Backend<T>& be = *backend_;
    const double a = double(be.max_abs(A)), b = double(be.max_abs(B));
    if (!std::isfinite(a)) refuse("lora_A holds NaN or Inf");
    if (!std::isfinite(b)) refuse("lora_B holds NaN or Inf");
    const double w = kernels_->max_abs(bits(), d_ * k_, precision_);
    if (!std::isfinite(w)) refuse("W holds NaN or Inf");
    // As merge_check.hpp: every entry is at most factor (max|W| + |s| r max|B| max|A|).
    const double bound = factor() * (w + std::abs(double(s)) * double(A.rows()) * b * a);
    if (bound <= 0.5 * double(std::numeric_limits<T>::max())) return;
    const Index block_rows = merge_block_rows(d_, k_);
    Tensor<T> block = be.allocate(block_rows, k_);  // a merge, not a training step, and rare
    for (Index first = 0; first < d_; first += block_rows) {
      const Index rows = std::min(block_rows, d_ - first);
      Tensor<T> sum(block.data(), rows, k_, block.device(), [](T*) {});
      kernels_->widen(bits() + first * k_, rows * k_, precision_, sum.data());
      be.gemm(Trans::no, Trans::no, s, row_view(B, first, rows), A, T(1), sum);
      apply(first, sum);
      if (!std::isfinite(double(be.max_abs(sum)))) {
        refuse("in rows [" + std::to_string(first) + ", " + std::to_string(first + rows) + ")");
      }
    }
  }
}

template <typename T>
void FrozenBase<T>::add_low_rank(T s, const Tensor<T>& B, const Tensor<T>& A, const RowBlock& before,
                                 const RowBlock& after) {
  Backend<T>& be = *backend_;
  if (!low_precision() || has_master()) {
    Tensor<T>& W = low_precision() ? master_ : W_;  // exact to fp32 rounding
    if (before) before(0, W);
    be.gemm(Trans::no, Trans::no, s, B, A, T(1), W);
    if (after) after(0, W);
    if (low_precision()) round_into_weight(master_, HalfRounding::nearest);
    return;
  }
  if constexpr (std::is_same<T, float>::value) {
    const HalfRounding mode = merge_ == BaseMerge::nearest ? HalfRounding::nearest : HalfRounding::stochastic;
    const RngKey key{rounding_key_.seed, rounding_stream_};
    if (mode == HalfRounding::stochastic) ++rounding_stream_;
    const Index block_rows = merge_block_rows(d_, k_);
    // Kept from the first merge on, so that a restart in a steady run allocates nothing.
    if (merge_block_.empty()) merge_block_ = be.allocate(block_rows, k_);
    for (Index first = 0; first < d_; first += block_rows) {
      const Index rows = std::min(block_rows, d_ - first);
      Tensor<T> sum(merge_block_.data(), rows, k_, merge_block_.device(), [](T*) {});
      kernels_->widen(bits() + first * k_, rows * k_, precision_, sum.data());
      if (before) before(first, sum);
      be.gemm(Trans::no, Trans::no, s, row_view(B, first, rows), A, T(1), sum);
      if (after) after(first, sum);
      // element index first * k + i: the same draws whatever the block size
      kernels_->round(sum.data(), rows * k_, first * k_, precision_, mode, key, bits() + first * k_);
    }
  }
}

template <typename T>
void FrozenBase<T>::for_each_row_block(const RowBlock& f) {
  if (!low_precision()) {
    f(0, W_);
    return;
  }
  if constexpr (std::is_same<T, float>::value) {
    const Index block_rows = merge_block_rows(d_, k_);
    if (merge_block_.empty()) merge_block_ = backend_->allocate(block_rows, k_);
    for (Index first = 0; first < d_; first += block_rows) {
      const Index rows = std::min(block_rows, d_ - first);
      Tensor<T> block(merge_block_.data(), rows, k_, merge_block_.device(), [](T*) {});
      kernels_->widen(bits() + first * k_, rows * k_, precision_, block.data());
      f(first, block);
    }
  }
}

template <typename T>
void FrozenBase<T>::weight_times_transposed(const Tensor<T>& A, Tensor<T>& P) {
  if (A.cols() != k_ || P.rows() != d_ || P.cols() != A.rows()) {  // the message only when thrown: a step allocates nothing
    throw ShapeError(name_ + " W A^T: A is " + A.shape() + " and P " + P.shape() + ", expected [r x " +
                     std::to_string(k_) + "] and [" + std::to_string(d_) + " x r]");
  }
  if constexpr (std::is_same<T, float>::value) {
    if (low_precision() && kernels_->weight_times_transposed(bits(), d_, k_, precision_, A, P)) return;
  }
  // Two pointers captured, within std::function's inline storage: a step allocates nothing.
  const std::pair<const Tensor<T>*, Tensor<T>*> operands{&A, &P};
  for_each_row_block([this, &operands](Index first, Tensor<T>& rows) {
    Tensor<T>& out = *operands.second;
    Tensor<T> part(out.data() + first * out.cols(), rows.rows(), out.cols(), out.device(), [](T*) {});  // P's rows
    backend_->gemm(Trans::no, Trans::yes, T(1), rows, *operands.first, T(0), part);
  });
}

template <typename T>
HostMatrix<T> FrozenBase<T>::weight_host() const {
  if (!low_precision()) return to_host(*backend_, W_);
  const HalfHostMatrix h = weight_bits();
  HostMatrix<T> W(d_, k_);
  for (Index i = 0; i < h.size(); ++i) W.data()[i] = T(half_bits::half_to_float(h.bits[std::size_t(i)], precision_));
  return W;
}

template <typename T>
HalfHostMatrix FrozenBase<T>::weight_bits() const {
  require_half("weight_bits");
  HalfHostMatrix h{precision_, d_, k_, std::vector<std::uint16_t>(std::size_t(W_.size()) * 2)};
  backend_->download(W_, reinterpret_cast<T*>(h.bits.data()));
  h.bits.resize(std::size_t(d_ * k_));
  return h;
}

template <typename T>
void FrozenBase<T>::check_weight_bits(const HalfHostMatrix& W, const std::string& what) const {
  if (W.format != precision_) {
    throw IoError(what + " is " + precision_name(W.format) + " but the layer's base is " + precision_name(precision_));
  }
  if (W.rows != d_ || W.cols != k_ || Index(W.bits.size()) != W.rows * W.cols) {
    throw IoError(what + " has shape " + shape_string(W.rows, W.cols) + " (" + std::to_string(W.bits.size()) +
                  " values), expected " + shape_string(d_, k_));
  }
  for (std::size_t i = 0; i < W.bits.size(); ++i) {
    if (half_bits::is_nan_or_inf(W.bits[i], precision_)) {
      throw IoError(what + " " + shape_string(d_, k_) + " holds NaN or Inf at (" + std::to_string(Index(i) / k_) +
                    ", " + std::to_string(Index(i) % k_) + ")");
    }
  }
}

template <typename T>
void FrozenBase<T>::set_weight_bits(const HalfHostMatrix& W) {
  require_half("set_weight_bits");
  check_weight_bits(W, name_ + " base weight W");
  std::vector<std::uint16_t> padded(std::size_t(W_.size()) * 2, 0);
  std::copy(W.bits.begin(), W.bits.end(), padded.begin());
  backend_->upload(reinterpret_cast<const T*>(padded.data()), W_);
  if (has_master()) {
    if constexpr (std::is_same<T, float>::value) kernels_->widen(bits(), d_ * k_, precision_, master_.data());
  }
}

template <typename T>
void FrozenBase<T>::set_weight(const Eigen::Ref<const HostMatrix<T>>& W) {
  const std::string what = name_ + " base weight W (out x in)";
  if (!low_precision()) {
    upload(*backend_, W, W_, what);
    return;
  }
  if (W.rows() != d_ || W.cols() != k_) {
    throw ShapeError(what + ": expected shape " + shape_string(d_, k_) + ", got " + shape_string(W.rows(), W.cols()));
  }
  require_finite<T>(W, what);
  if (has_master()) {
    upload(*backend_, W, master_, what);
    round_into_weight(master_, HalfRounding::nearest);
    return;
  }
  // Rounded on the host (the same function the device kernels run): no fp32 copy on the device.
  HalfHostMatrix h{precision_, d_, k_, std::vector<std::uint16_t>(std::size_t(d_ * k_))};
  const double largest = half_max(precision_);
  for (Index i = 0; i < d_; ++i) {
    for (Index j = 0; j < k_; ++j) {
      if (std::abs(double(W(i, j))) > largest) {  // would saturate: refuse rather than change W
        throw ShapeError(what + " " + shape_string(d_, k_) + ": " + std::to_string(double(W(i, j))) + " at (" +
                         std::to_string(i) + ", " + std::to_string(j) + ") is beyond " + precision_name(precision_) +
                         "'s largest value " + std::to_string(largest));
      }
      h.bits[std::size_t(i * k_ + j)] =
          half_bits::round_float(float(W(i, j)), precision_, HalfRounding::nearest, 0.0f);
    }
  }
  set_weight_bits(h);
}

template <typename T>
void FrozenBase<T>::random_weight(RngKey key, T low, T high) {
  if (!low_precision()) {
    backend_->random_uniform(key, low, high, W_);
    return;
  }
  Tensor<T> exact = has_master() ? Tensor<T>() : backend_->allocate(d_, k_);
  Tensor<T>& target = has_master() ? master_ : exact;
  backend_->random_uniform(key, low, high, target);
  round_into_weight(target, HalfRounding::nearest);
}

template <typename T>
void FrozenBase<T>::bias_rounded_to_format() {
  if (!low_precision() || bias_ != BiasMode::frozen) return;
  HostMatrix<T> b = to_host(*backend_, b_);
  for (Index i = 0; i < b.size(); ++i) {
    const float x = float(b.data()[i]);
    b.data()[i] = T(half_bits::half_to_float(half_bits::round_float(x, precision_, HalfRounding::nearest, 0.0f),
                                             precision_));
  }
  backend_->upload(b.data(), b_);
}

template <typename T>
void FrozenBase<T>::set_bias(const Eigen::Ref<const HostMatrix<T>>& b) {
  upload(*backend_, b, b_, name_ + " bias b");
  bias_rounded_to_format();
}

template <typename T>
void FrozenBase<T>::random_bias(RngKey key, T low, T high) {
  backend_->random_uniform(key, low, high, b_);
  bias_rounded_to_format();
}

template <typename T>
std::size_t FrozenBase<T>::weight_bytes() const {
  return std::size_t(W_.size() + master_.size() + merge_block_.size()) * sizeof(T);
}

template class FrozenBase<float>;
template class FrozenBase<double>;

}  // namespace relora
