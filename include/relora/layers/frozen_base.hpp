#pragma once
// A layer's frozen base: the weight W (d x k) and an optional bias b (d), with the two products
// every adapter on it needs, Y = X W^T + b and dX = dY W, and the update a merge makes,
// W += s B A. W is stored in fp32, bf16 or fp16 (LoraConfig::base_precision); the layer's math is
// written once against this class and does not ask which.
//
// fp32: W is an fp32 tensor and the products are the backend's GEMMs, exactly as before.
// bf16 / fp16: W holds 16-bit values (half the bytes); the products accumulate in fp32 (tensor
// cores on CUDA, where the fp32 operand X or dY is rounded to W's format first, as autocast does;
// Eigen's fp32 kernels on a widened copy of W on the CPU). A merge lands as BaseMerge says: rounded
// stochastically, into an fp32 master copy that W is rounded from, or rounded to nearest.
// Training W itself (full fine-tuning) always uses an fp32 master: the optimizer steps the master
// and sync_from_master() rounds it into W before the next product.
// A frozen bias is rounded to the format once (it is saved in it) and kept widened in fp32, d
// values; a trainable bias is fp32.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "relora/core/half_precision.hpp"
#include "relora/core/half_tensor.hpp"
#include "relora/core/host_matrix.hpp"
#include "relora/layers/lora_config.hpp"

namespace relora {

class FrozenBaseKernels;  // lib/layers/frozen_base_kernels.hpp

template <typename T>
class FrozenBase {
 public:
  // Storage for a d x k weight (contents unspecified until set) and the bias `bias` asks for.
  // `name` prefixes messages ("LoraLinear 4 -> 3"). Throws ConfigError for a 16-bit base of a
  // non-float layer.
  FrozenBase(Backend<T>& backend, Index out_features, Index in_features, BiasMode bias, BasePrecision precision,
             BaseMerge merge, std::uint64_t seed, std::string name);
  ~FrozenBase();
  FrozenBase(const FrozenBase&) = delete;
  FrozenBase& operator=(const FrozenBase&) = delete;

  BasePrecision precision() const { return precision_; }
  bool low_precision() const { return precision_ != BasePrecision::fp32; }
  BaseMerge merge_mode() const { return merge_; }
  Index out_features() const { return d_; }
  Index in_features() const { return k_; }
  bool has_bias() const { return bias_ != BiasMode::none; }

  // Y = X W^T (+ b).
  void forward(const Tensor<T>& X, Tensor<T>& Y);
  // Y = X W^T (+ b) + beta Y: a layer that wrote its adapter's term into Y first adds the product
  // onto it (on a 16-bit base in the product's epilogue, bias included, instead of passes of their own).
  void forward(const Tensor<T>& X, T beta, Tensor<T>& Y);
  // Y = f(X W^T (+ b) + beta Y), f identity or ReLU (ConfigError for another): on CUDA (float) the
  // product's epilogue applies the ReLU, on the CPU a pass after the product.
  void forward(const Tensor<T>& X, T beta, Activation f, Tensor<T>& Y);
  // Y = X W^T, without the bias (for a layer that adds it in a pass of its own).
  void product(const Tensor<T>& X, Tensor<T>& Y);
  // Y = X W^T + beta Y, without the bias.
  void product(const Tensor<T>& X, T beta, Tensor<T>& Y);
  // dX = dY W + beta dX.
  void input_gradient(const Tensor<T>& dY, T beta, Tensor<T>& dX);

  // The same products on 16-bit activations in `format` (Layer::take_half_activations): whether
  // this base has them (a 16-bit W of that format, on a device with such products: CUDA).
  bool has_half_activation_products(BasePrecision format) const;
  // Y = f(X W^T + beta Y) and dX = dY W + beta dX, all four 16-bit in W's format, rounded to
  // nearest once after the fp32 accumulation. The forward leaves the bias out: the layer adds it
  // into Y first (beta 1), with its adapter's term. ConfigError where has_half_activation_products
  // is false.
  void forward_half(const HalfTensor& X, float beta, Activation f, HalfTensor& Y);
  void input_gradient_half(const HalfTensor& dY, float beta, HalfTensor& dX);

  // W as fp32: W itself, or a 16-bit W's master. ConfigError when a 16-bit W has no master.
  Tensor<T>& weight();
  const Tensor<T>& weight() const;
  bool has_master() const { return !master_.empty(); }
  // The fp32 tensor an optimizer steps when W trains: W, or the master (made from W now if needed).
  Tensor<T>& trainable_weight();
  // A 16-bit W rounded to nearest from its master (after an optimizer step); nothing for fp32.
  void sync_from_master();
  // The bias as fp32 (1 x d).
  Tensor<T>& bias() { return b_; }
  const Tensor<T>& bias() const { return b_; }

  // A block of W's rows as fp32: first_row, and the rows (a view of W itself for fp32, one block
  // holding all of W; a widened copy, valid during the call, for 16-bit).
  using RowBlock = std::function<void(Index first_row, Tensor<T>& rows)>;

  // Throws what add_low_rank() would refuse (refuse(where) throws, naming the layer): F (W + s B A)
  // holding NaN or Inf, where F scales rows (merge_check.hpp): row_factor() returns F's largest
  // factor (1 without F) and finish(first, rows) applies F to a block of the sums. Changes nothing.
  void check_add_low_rank(T s, const Tensor<T>& B, const Tensor<T>& A,
                          const std::function<void(const std::string&)>& refuse,
                          const std::function<double()>& row_factor = {}, const RowBlock& finish = {});
  // W = after(before(W) + s B A), `before` and `after` (optional) transforming blocks of rows in
  // place, landing in a 16-bit W as merge_mode() says (into the master when there is one).
  void add_low_rank(T s, const Tensor<T>& B, const Tensor<T>& A, const RowBlock& before = {},
                    const RowBlock& after = {});
  // P = W A^T (A: r x k, P: d x r), DoRA's product with W every step. A bf16 W on CUDA multiplies
  // A split into three bf16 terms (hi + mid + lo = A exactly for normal values) on tensor cores,
  // each product exact and summed in fp32: W is not widened. Elsewhere W's rows are widened a
  // block at a time and multiplied by the backend's GEMM.
  void weight_times_transposed(const Tensor<T>& A, Tensor<T>& P);
  // f(first, rows) over W's rows as fp32, in blocks, in order (norms of rows, W A^T, Bq^T W).
  void for_each_row_block(const RowBlock& f);

  // W as fp32 on the host (a 16-bit W widened, exact).
  HostMatrix<T> weight_host() const;
  // W = a host fp32 matrix (shape and finiteness checked), rounded to nearest for a 16-bit W (a
  // master takes the values exactly).
  void set_weight(const Eigen::Ref<const HostMatrix<T>>& W);
  // A 16-bit W's bits; the format and shape must be the layer's, every value finite.
  HalfHostMatrix weight_bits() const;
  void set_weight_bits(const HalfHostMatrix& W);
  // W drawn U(low, high) from `key` (rounded to nearest for a 16-bit W).
  void random_weight(RngKey key, T low, T high);
  // b = a host vector (1 x d), rounded to the format when the bias is frozen and W 16-bit.
  void set_bias(const Eigen::Ref<const HostMatrix<T>>& b);
  void random_bias(RngKey key, T low, T high);

  // Throws IoError unless `W` can be set_weight_bits() (format, shape, finite).
  void check_weight_bits(const HalfHostMatrix& W, const std::string& what) const;

  // Draws of stochastic rounding so far (saved with the layer so a resumed run rounds the same).
  std::uint64_t rounding_stream() const { return rounding_stream_; }
  void set_rounding_stream(std::uint64_t stream) { rounding_stream_ = stream; }

  // Bytes of the base on the device: W, its master, and the merge scratch of a 16-bit W without
  // one (at most 16 MiB, kept from the first merge on) (for benchmarks and docs).
  std::size_t weight_bytes() const;

 private:
  void require_half(const char* operation) const;
  // Y = f(X W^T (+ b when with_bias) + beta Y), f identity or ReLU.
  void multiply(const Tensor<T>& X, T beta, bool with_bias, Activation f, Tensor<T>& Y);
  void bias_rounded_to_format();
  std::uint16_t* bits();
  const std::uint16_t* bits() const;
  // A 16-bit W from the fp32 values of `src` (same shape), rounded as `mode` says.
  void round_into_weight(const Tensor<T>& src, HalfRounding mode);

  Backend<T>* backend_;
  Index d_, k_;
  BiasMode bias_;
  BasePrecision precision_;
  BaseMerge merge_;
  RngKey rounding_key_;  // seed of stochastic rounding; stream = rounding_stream_
  std::uint64_t rounding_stream_ = 0;
  std::string name_;

  Tensor<T> W_;        // fp32 W, or (16-bit) raw storage of d * k 16-bit values
  Tensor<T> master_;   // fp32 master of a 16-bit W (BaseMerge::fp32_master, or W trains)
  Tensor<T> b_;        // 1 x d
  Tensor<T> merge_block_;  // rows of W + s B A in fp32 while a merge without a master rounds them
  std::unique_ptr<FrozenBaseKernels> kernels_;
};

extern template class FrozenBase<float>;
extern template class FrozenBase<double>;

}  // namespace relora
