#pragma once
// DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024): a linear layer whose frozen base
// W is re-scaled row by row by a trainable magnitude m, with a LoRA adapter changing the rows'
// direction. A sibling kind of layer to LoraLinear ("dora" in checkpoints), configured by the
// same LoraConfig plus the fields of DoraConfig.
//
// Letters: n rows of input, k = in_features, d = out_features, r = rank, s = scale. X is n x k,
// W is d x k (frozen), b is d, A is r x k, B is d x r, m is d. Row i of a matrix is M_i.
//
// Forward. With V = W + s B A and n_i = ||V_i|| (the norm of output row i, as PEFT):
//
//   g_i = m_i / max(n_i, eps)
//   U = X A^T,   Z = X W^T + s U B^T,   Y = Z diag(g) + b
//
// V (d x k) is never formed in a training step: with P = W A^T (d x r), G = A A^T (r x r),
//
//   n_i^2 = ||W_i||^2 + 2 s B_i . P_i + s^2 B_i G B_i^T = ||W_i||^2 + sum_j B_ij (2 s P_ij + s^2 (B G)_ij)
//
// ||W_i||^2 is cached and refreshed whenever W changes (set_W, merge, unmerge, restore_state, and
// every forward while W itself trains). The identity loses relative accuracy where V_i nearly
// cancels (n_i much smaller than ||W_i|| + ||s B_i A||): its rounding error is about
// (k + r) u (||W_i|| + ||s B_i A||)^2 in n_i^2, u the unit roundoff, against about k u n_i^2 for
// the formed norm. A row whose computed n_i^2 is negative is given n_i = 0. eps (> 0) keeps a zero
// row of W (real models have them) finite: there g_i = m_i / eps, and the output row is 0.
//
// m starts as the row norms of W (so g = 1 and the fresh layer gives the base output).
//
// Dropout on the adapter branch follows PEFT (DoraLinearVariant.forward): with a mask, PEFT
// computes  base(x) + (g - 1) (D(x) W^T) + g s lora_B(lora_A(D(x))),  which is here, with Xd = D(X)
// (inverted dropout) and E = X - Xd:
//
//   U = Xd A^T,   Z = Xd W^T + s U B^T,   Y = E W^T + Z diag(g) + b
//
// (without a mask E = 0 and this is the formula above). It costs a second n x d x k product in
// the forward and in the backward, as it does in PEFT.
//
// Backward, given dY. Detached norm (the default; the paper's section 4.3 and PEFT: n is a
// constant of the backward, so g depends on m alone):
//
//   dZ = dY diag(g)                                       (in dY's buffer, or g folded into B and dB)
//   dm_i = sum_t dY_ti Z_ti / max(n_i, eps)               (Z_ti = (Y_ti - b_i) / g_i, see Memory below)
//   db = sum_t dY_t
//   dB = s dZ^T U,   dU = s dZ B,   dA = dU^T Xd
//   dX = dZ W + dU A                                      (no mask)
//   dX = dY W + M .* (dY diag(g - 1) W + dU A)            (mask M: (1 - M) .* dY W from E, M .* (dZ W + dU A) from Xd)
//
// Exact gradient (DoraGradient::exact) adds the path through n into A and B. Where n_i > eps,
// dL/dn_i = -(sum_t dY_ti Z_ti) m_i / n_i^2 (0 where n_i <= eps: there g does not depend on n).
// Let q_i = (dL/dn_i) / n_i = -dm_i m_i / n_i^2. Since dn_i / dV_i = V_i / n_i and V_i = W_i + s B_i A:
//
//   dn_i/dB_i = s V_i A^T / n_i = (s P_i + s^2 (B G)_i) / n_i    ->   dB += diag(q) (s P + s^2 B G)
//   dn_i/dA   = s B_i^T V_i / n_i                                 ->   dA += s Bq^T W + s^2 (Bq^T B) A,  Bq = diag(q) B
//
// (sum_i q_i B_i^T V_i = Bq^T W + s Bq^T B A: one r x d x k product, no d x k temporary.)
//
// Full fine-tuning (TrainTarget::base, ReLoRA's warm start): W trains, m and the adapter do not,
// and no dropout mask is drawn. dW = dZ^T X; the exact mode adds diag(q) V = diag(q) W + s Bq A.
//
// Merge: W <- diag(g) V, after checking that the result is finite (W unchanged otherwise), and
// the g of the merge is kept; forward then computes X W^T + b. Unmerge: W <- diag(1/g) W - s B A.
// reinit(): A re-drawn, B = 0 and m = the row norms of the (merged) W. After a merge those norms
// are |m_i| n_i / max(n_i, eps), so m keeps its value wherever m_i >= 0 and n_i >= eps, and g
// comes out exactly 1 wherever they are >= eps: the output is unchanged through a ReLoRA restart
// (a row with m_i < 0 keeps its output, which carries the sign, with m_i = |m_i|).
//
// Memory. Beyond LoRA's per-batch buffers (U, Y, dU) the layer keeps no n x d matrix: Z is not
// stored but read back from Y in the backward, Z_ti = (Y_ti - b_i) / g_i, in the pass that sums dm
// (lib/layers/dora_recovery.hpp: when that is exact enough, and the columns recomputed from X, W, U
// and B when it is not, or when g_i = 0); and dZ = dY diag(g) is written over dY (Layer::backward
// may use its dY as scratch). With a dropout mask Y also holds E W^T, so Z is then kept (an n x d
// buffer, allocated only when config.lora.dropout > 0). Because Z is read back from the output, a
// caller that changes the output in place between forward and backward (the Model's in-place ReLU)
// must leave it unchanged wherever dY is not zero, as ReLU does.
//
// Per-batch buffers are sized on the first forward and reused; parameter-sized ones (P, G, B G,
// n, g...) at construction: a steady training step allocates nothing.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "relora/core/host_matrix.hpp"
#include "relora/layers/layer.hpp"
#include "relora/layers/frozen_base.hpp"
#include "relora/layers/lora_config.hpp"

namespace relora {

template <typename T>
class DoraKernels;

enum class DoraGradient {
  detached,  // n is a constant of the backward (the paper's section 4.3, PEFT)
  exact,     // the gradient also flows through n into A and B (and W while it trains)
};

struct DoraConfig {
  LoraConfig lora;  // shapes, rank, alpha, rsLoRA, dropout, init of A, bias, seed
  DoraGradient gradient = DoraGradient::detached;
  double eps = 1e-6;  // g_i = m_i / max(n_i, eps); > 0 and finite
};

// Throws ConfigError naming the bad value and the layer's shape.
void validate(const DoraConfig& config);

template <typename T>
class DoraLinear : public Layer<T> {
 public:
  // W: d x k base weight. The bias, when config.lora.bias is not none, starts at zero.
  DoraLinear(Backend<T>& backend, const DoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W);
  DoraLinear(Backend<T>& backend, const DoraConfig& config, const Eigen::Ref<const HostMatrix<T>>& W,
             const Eigen::Ref<const HostVector<T>>& b);
  // Base weight (and bias) drawn as nn.Linear does, U(-1/sqrt(k), 1/sqrt(k)), from the layer's seed.
  DoraLinear(Backend<T>& backend, const DoraConfig& config);
  ~DoraLinear() override;

  DoraLinear(const DoraLinear&) = delete;
  DoraLinear& operator=(const DoraLinear&) = delete;

  const char* kind() const override { return "dora"; }
  const char* implementation() const override { return "reference"; }
  Index in_features() const override { return lora_config().in_features; }
  Index out_features() const override { return lora_config().out_features; }

  const Tensor<T>& forward(const Tensor<T>& X) override;
  void backward(const Tensor<T>& dY, Tensor<T>* dX) override;

  // Takes ReLU: the pass that scales Z into Y applies it (the base's product when merged). The
  // entries ReLU clamps get a zero gradient, so the backward's reading of Z back from Y is
  // unaffected, as when the model applies the ReLU in place.
  bool take_output_activation(Activation f) override;
  Activation output_activation() const { return output_activation_; }
  const Tensor<T>& output() const override { return Y_; }
  Tensor<T>& mutable_output() override { return Y_; }
  // Adapter training: prefix.lora_A, prefix.lora_B, prefix.lora_magnitude_vector (PEFT's names:
  // PEFT saves the magnitude as <module>.lora_magnitude_vector), prefix.bias if it trains.
  // Base training: prefix.weight, prefix.bias if it trains.
  std::vector<Parameter<T>> parameters(const std::string& prefix) override;

  void set_training(bool training) override { training_ = training; }
  bool training() const override { return training_; }
  void set_batch_offset(Index first_row) override;
  void set_train_target(TrainTarget target) override;
  TrainTarget train_target() const override { return target_; }

  void merge() override;
  void check_merge() override;
  void unmerge() override;
  bool merged() const override { return merged_; }
  void reinit() override;

  bool replayable() const override { return !dropout_in_use(); }
  std::uint32_t step_signature() const override;

  void save_state(StateDict<T>& state) const override;
  void check_state(const StateDict<T>& state) const override;
  void restore_state(const StateDict<T>& state) override;

  const DoraConfig& config() const { return config_; }
  const LoraConfig& lora_config() const { return config_.lora; }
  T scale() const { return scale_; }
  Index rank() const { return config_.lora.rank; }
  bool has_bias() const { return config_.lora.bias != BiasMode::none; }

  // W as fp32 (a 16-bit W's master; ConfigError for a 16-bit W without one: use base()).
  const Tensor<T>& W() const { return base_.weight(); }
  const Tensor<T>& b() const { return base_.bias(); }
  const FrozenBase<T>& base() const { return base_; }
  const Tensor<T>& A() const { return A_; }
  const Tensor<T>& B() const { return B_; }
  const Tensor<T>& m() const { return m_; }
  // n and g of the last forward (or merge), 1 x d.
  const Tensor<T>& norms() const { return n_; }
  const Tensor<T>& factors() const { return g_; }
  const Tensor<T>& dX() const { return dX_view_.empty() ? dX_ : dX_view_; }
  const Tensor<T>& dW() const { return dW_; }
  const Tensor<T>& db() const { return db_; }
  const Tensor<T>& dA() const { return dA_; }
  const Tensor<T>& dB() const { return dB_; }
  const Tensor<T>& dm() const { return dm_; }
  const Tensor<T>& dropout_mask() const { return mask_; }
  // 1 x d: 1 where the last backward recomputed Z's column for dm instead of reading it back from Y
  // (lib/layers/dora_recovery.hpp), 0 elsewhere; not written by a backward with a dropout mask.
  const Tensor<T>& recomputed_columns() const { return recompute_; }

  // Host-side setters, shapes checked.
  void set_W(const Eigen::Ref<const HostMatrix<T>>& W);
  // A 16-bit W's bits, kept as they are (format and shape must be the layer's).
  void set_W_bits(const HalfHostMatrix& W);
  void set_b(const Eigen::Ref<const HostMatrix<T>>& b);  // 1 x d or d x 1
  void set_A(const Eigen::Ref<const HostMatrix<T>>& A);
  void set_B(const Eigen::Ref<const HostMatrix<T>>& B);
  void set_m(const Eigen::Ref<const HostMatrix<T>>& m);  // 1 x d or d x 1

  // Random draws so far (dropout masks, inits of A); setting it back replays the same masks.
  std::uint64_t rng_stream() const { return rng_stream_; }
  void set_rng_stream(std::uint64_t stream) { rng_stream_ = stream; }

 private:
  void prepare();
  void allocate_parameters();
  void draw_A();
  void resize_batch(Index n);
  void refresh_W_norms();  // wsq = ||W_i||^2, after W changed
  void refresh_factors();  // P, G, B G, n and g from the current W, A, B and m
  void require_not_merged(const char* operation) const;
  std::string name() const;
  bool dropout_in_use() const { return training_ && config_.lora.dropout > 0 && target_ == TrainTarget::adapter; }
  bool bias_trains() const { return config_.lora.bias == BiasMode::trainable; }
  bool exact() const { return config_.gradient == DoraGradient::exact; }
  // Whether the forward keeps Z in a buffer of its own (dropout, or a 16-bit base) rather than
  // computing it in Y's buffer for the backward to read back.
  bool keeps_Z() const { return dropout_active_ || base_.low_precision(); }
  Tensor<T>& own_dX();
  // Upload of a d-vector given as a row or a column.
  void upload_vector(const Eigen::Ref<const HostMatrix<T>>& v, Tensor<T>& dst, const char* what);
  RngKey next_key() { return RngKey{config_.lora.seed, rng_stream_++}; }
  // The key of a dropout mask of the batch: the rows from batch_offset_ of the whole batch's mask.
  RngKey next_mask_key() {
    RngKey key = next_key();
    key.first = std::uint64_t(batch_offset_) * std::uint64_t(config_.lora.in_features);
    return key;
  }

  Backend<T>* backend_;
  std::unique_ptr<DoraKernels<T>> kernels_;
  DoraConfig config_;
  T scale_;
  T eps_;
  FrozenBase<T> base_;  // W and b, in fp32, bf16 or fp16
  Tensor<T> A_, B_, m_;
  Tensor<T> dW_, db_, dA_, dB_, dm_;
  // Parameter-sized work: ||W_i||^2, P = W A^T, G = A A^T, B G, n, g, the exact mode's q,
  // diag(q) B and (diag(q) B)^T B, the g of the last merge, diag(g) B (dU = s dY diag(g) B when dY is
  // not scaled in place) and the flags of the columns whose Z the backward recomputes.
  Tensor<T> wsq_, P_, G_, BG_, n_, g_, q_, Bq_, H_, merge_g_, Bg_, recompute_;
  // Per batch. Z_ only with a dropout mask (Y holds E W^T as well) or a 16-bit base (keeps_Z());
  // otherwise the forward computes Z in Y's buffer and the backward reads it back from Y.
  Tensor<T> U_, Y_, dU_;
  Tensor<T> mask_, X_dropped_, E_, dX_lora_, Z_, dX_;
  Tensor<T> dX_view_;

  TrainTarget target_ = TrainTarget::adapter;
  Activation output_activation_ = Activation::identity;
  bool training_ = true;
  bool merged_ = false;
  std::uint64_t rng_stream_ = 0;
  Index batch_offset_ = 0;
  Index batch_rows_ = -1;
  const Tensor<T>* X_ = nullptr;
  bool dropout_active_ = false;
};

extern template class DoraLinear<float>;
extern template class DoraLinear<double>;

}  // namespace relora
