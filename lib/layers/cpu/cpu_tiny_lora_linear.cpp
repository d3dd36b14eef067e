// A tiny LoRA layer's forward (with the MSE after it, where it is a model's last) and backward in
// one pass each, on the CPU. A sibling of LoraLinear (chosen by make_lora_linear), which it falls
// back to outside its range.
//
// Why: at tiny widths (n = 200, k = 10, d = 5, r = 4, say) each of a step's six products is a few
// thousand multiply-adds, and Eigen's GEMM spends more than that around it: row-major, the
// product's long side (n) lands on the micro-kernel's short side, so most SIMD lanes compute
// padding, and every call packs its operands again. Here the batch is computed feature-major: each
// group of kLanes rows is transposed into one SIMD register per feature (every lane a real row of
// the batch), the layer's products run as multiply-adds across those lanes with the small
// matrices' entries broadcast, and the results are transposed back. No allocation, no threads.
//
// Where the time goes in such a step: most in the combine kernels, then the transposes of U, Y,
// dY and dU back to rows, then the reductions for dA, dB and db, then the memcmp of the kept
// panels and Adam. So each tensor is transposed at most once per step, and the batch and the
// target not at all once they are kept:
// - the forward keeps its feature-major X and U in the layer (TinyLoraPanels), and the backward
//   that follows reads those instead of transposing them again: X and U are unchanged in between
//   (LoraLinear's contract for X; U is the layer's own);
// - X's panel and the target's are kept from one step to the next while the tensors hold the
//   values they were made from (compared with a copy of their rows): full-batch training passes
//   the same batch every step, and a batch rewritten in place, through the backend or not, is
//   transposed again;
// - with the MSE computed in the last layer's forward (forward_with_loss), dY and dU = s dY B are
//   computed there while the strip is in L1, and its backward reads their panels when it is given
//   that dY.
//
// Beyond the limits below the separate products are faster (Eigen's blocked kernels and its
// threads): fast_path_for says no and the layer runs LoraLinear's products.
#include <algorithm>

#include "layers/cpu/cpu_tiny_lora_linear.hpp"

#include "layers/cpu/cpu_panels.hpp"
#include "relora/losses/mse_loss.hpp"

namespace relora {
namespace {

using namespace cpu_panels;

constexpr Index kMaxWidth = 16;  // k and d
constexpr Index kMaxRank = 8;    // beyond it the reductions for dA and dB outweigh what fusing saves
// Rows per strip: each pass runs over a strip of rows before the next, so that a large batch is
// computed while its rows are in L1 (a batch of up to kStrip rows is one strip).
constexpr Index kStrip = 256;
static_assert(kStrip % kLanes<float> == 0 && kStrip % kLanes<double> == 0, "a strip holds whole registers");
// Multiply-adds per step (forward and backward together) up to which the pass is used: beyond it
// Eigen's blocked kernels, and its threads, catch up (docs/PERFORMANCE.md).
constexpr double kMaxWork = double(1 << 20);

// What the forward writes beside Y when the MSE is fused into it: dY = grad_scale (Y - target),
// the squared differences' sum and dU = s dY B, as CpuBackend::mse and the backward would.
template <typename T>
struct FusedMseOutputs {
  const T* target;     // n x d
  bool target_loaded;  // the kept target panel already holds it
  T grad_scale;
  T* dY;  // n x d
  T* dU;  // n x r
  double squared_errors = 0;
};

// A layer's shape and its operands, as both passes read them.
template <typename T>
struct LayerView {
  Index n, k, d, r;  // rows, in, out, rank
  const T* X;
  const T* W;
  const T* A;
  const T* B;
};

// Strip by strip: X into its panel (unless `X_loaded`), U = X A^T, Y = X W^T + b + s U B^T, and
// where `mse` is given dY and dU from Y while the strip is in L1. The panels of X and U (and of the
// target, dY and dU) cover the whole batch, for the backward and the next step to read.
template <typename T>
void forward_strips(TinyLoraPanels<T>& scratch, const LayerView<T>& v, bool X_loaded, const T* b, T s, T* U, T* Y,
                    FusedMseOutputs<T>* mse) {
  const Index n = v.n, k = v.k, d = v.d, r = v.r, ld = panel_stride<T>(n);
  T* Xt = panel(scratch.X.panel, k, ld);
  T* Ut = panel(scratch.Ut, r, ld);
  T* Yt = panel(scratch.strip, d, kStrip);
  T* Tt = mse ? panel(scratch.target.panel, d, ld) : nullptr;
  T* dYt = mse ? panel(scratch.dYt, d, ld) : nullptr;
  T* dUt = mse ? panel(scratch.dUt, r, ld) : nullptr;
  for (Index first = 0; first < n; first += kStrip) {
    const Index rows = std::min(kStrip, n - first), lanes = panel_stride<T>(rows);
    T* xt = Xt + first;
    T* ut = Ut + first;
    if (!X_loaded) load_rows(v.X + first * k, k, rows, xt, ld);
    combine(v.A, k, Index(1), r, k, T(1), xt, ld, ut, ld, lanes);                                // U = X A^T
    combine(v.W, k, Index(1), d, k, T(1), xt, ld, Yt, kStrip, lanes, b);                         // Y = X W^T + b
    combine(v.B, r, Index(1), d, r, s, ut, ld, Yt, kStrip, lanes, nullptr, /*accumulate=*/true);  // Y += s U B^T
    store_rows(ut, ld, r, rows, U + first * r);
    store_rows(Yt, kStrip, d, rows, Y + first * d);
    if (mse) {
      T* tt = Tt + first;
      T* dyt = dYt + first;
      T* dut = dUt + first;
      if (!mse->target_loaded) load_rows(mse->target + first * d, d, rows, tt, ld);
      mse->squared_errors += squared_errors_in_lanes(Yt, kStrip, tt, ld, dyt, ld, d, rows, mse->grad_scale);
      combine(v.B, Index(1), r, r, d, s, dyt, ld, dut, ld, lanes);  // dU = s dY B: coef(q, o) = B[o, q]
      store_rows(dyt, ld, d, rows, mse->dY + first * d);
      store_rows(dut, ld, r, rows, mse->dU + first * r);
    }
  }
}

}  // namespace

template <typename T>
bool CpuTinyLoraLinear<T>::suits(const LoraConfig& config) {
  return config.in_features <= kMaxWidth && config.out_features <= kMaxWidth && config.rank <= kMaxRank;
}

template <typename T>
bool CpuTinyLoraLinear<T>::fast_path_for(Index n) const {
  const Index k = this->config_.in_features, d = this->config_.out_features, r = this->config_.rank;
  const double work = double(n) * double(2 * k * r + 2 * k * d + 3 * d * r);
  return suits(this->config_) && work <= kMaxWork;
}

template <typename T>
double CpuTinyLoraLinear<T>::forward_pass(const Tensor<T>& X, const Tensor<T>* target, T* dY) {
  this->begin_forward(X);
  const Index n = X.rows();
  const Tensor<T>& W = this->base_.weight();
  const LayerView<T> v{n, X.cols(), W.rows(), this->A_.rows(), X.data(), W.data(), this->A_.data(),
                       this->B_.data()};
  panels_.U_valid = false;  // until the panels hold this forward's U (and dY, dU)
  panels_.dY = {};
  const bool X_loaded = panels_.X.holds(X);
  FusedMseOutputs<T> mse{nullptr, false, T(0), dY, this->dU_.data()};
  if (target) {
    mse.target = target->data();
    mse.target_loaded = panels_.target.holds(*target);
    mse.grad_scale = T(2) / T(target->size());  // MseLoss's scale
  }
  forward_strips<T>(panels_, v, X_loaded, this->has_bias() ? this->base_.bias().data() : nullptr, this->scale_,
                    this->U_.data(), this->Y_.data(), target ? &mse : nullptr);
  if (!X_loaded) panels_.X.keep(X);
  panels_.U_valid = true;
  if (target && !mse.target_loaded) panels_.target.keep(*target);
  return mse.squared_errors;
}

template <typename T>
const Tensor<T>& CpuTinyLoraLinear<T>::forward(const Tensor<T>& X) {
  if (this->merged() || this->dropout_in_use() || !fast_path_for(X.rows())) {
    panels_.U_valid = false;
    panels_.dY = {};
    return LoraLinear<T>::forward(X);
  }
  forward_pass(X, nullptr, nullptr);
  return this->Y_;
}

template <typename T>
void CpuTinyLoraLinear<T>::forward_with_loss(const Tensor<T>& X, Loss<T>& loss, const Tensor<T>& target) {
  auto* mse = dynamic_cast<MseLoss<T>*>(&loss);
  if (mse == nullptr || this->merged() || this->dropout_in_use() || !fast_path_for(X.rows())) {
    return Layer<T>::forward_with_loss(X, loss, target);
  }
  if (!target.same_shape(X.rows(), this->out_features())) {
    throw ShapeError("MseLoss: prediction is " + shape_string(X.rows(), this->out_features()) + " but target is " +
                     target.shape());
  }
  Tensor<T>& dY = mse->gradient_buffer(target);
  const double squared_errors = forward_pass(X, &target, dY.data());
  mse->value_buffer().data()[0] = T(squared_errors / double(target.size()));  // and its mean
  panels_.dY = {dY.data(), dY.rows(), dY.cols()};
}

template <typename T>
void CpuTinyLoraLinear<T>::backward(const Tensor<T>& dY, Tensor<T>* dX) {
  this->begin_backward(dY, dX);
  const Index n = this->batch_rows();
  if (!this->plain_backward() || !fast_path_for(n)) return LoraLinear<T>::backward(dY, dX);
  const Tensor<T>& X = this->input();
  const Index k = this->in_features(), d = this->out_features(), r = this->rank(), ld = panel_stride<T>(n);
  const T s = this->scale_;
  const T* W = this->base_.weight().data();
  const T* A = this->A_.data();
  const T* B = this->B_.data();

  // X and U feature-major: the forward's copies (see the top).
  T* Xt = panel(panels_.X.panel, k, ld);
  T* Ut = panel(panels_.Ut, r, ld);
  if (!panels_.X.source.is(X)) {
    load_rows(X.data(), k, n, Xt, ld);
    panels_.X.keep(X);
  }
  if (!panels_.U_valid) {
    load_rows(this->U_.data(), r, n, Ut, ld);
    panels_.U_valid = true;
  }
  // dY and dU = s dY B feature-major: forward_with_loss's, when it computed them for this dY.
  const bool from_mse = panels_.dY.is(dY);
  panels_.dY = {};  // the panels are this backward's from here on

  T* dYt = panel(panels_.dYt, d, ld);
  T* dUt = panel(panels_.dUt, r, ld);
  T* dXt = dX ? panel(panels_.strip, k, kStrip) : nullptr;
  if (!from_mse || dXt) {
    for (Index first = 0; first < n; first += kStrip) {
      const Index rows = std::min(kStrip, n - first), lanes = panel_stride<T>(rows);
      T* dyt = dYt + first;
      T* dut = dUt + first;
      if (!from_mse) {
        load_rows(dY.data() + first * d, d, rows, dyt, ld);
        combine(B, Index(1), r, r, d, s, dyt, ld, dut, ld, lanes);  // dU = s dY B: coef(q, o) = B[o, q]
        store_rows(dut, ld, r, rows, this->dU_.data() + first * r);
      }
      if (dXt) {
        combine(W, Index(1), k, k, d, T(1), dyt, ld, dXt, kStrip, lanes);                               // dX = dY W
        combine(A, Index(1), k, k, r, T(1), dut, ld, dXt, kStrip, lanes, nullptr, /*accumulate=*/true);  // += dU A
        store_rows(dXt, kStrip, k, rows, dX->data() + first * k);
      }
    }
  }
  dot_all(Ut, r, dYt, d, ld, s, this->dB_.data(), Index(1), r);     // dB[o, q] = s <dY_o, U_q>
  dot_all(dUt, r, Xt, k, ld, T(1), this->dA_.data(), k, Index(1));  // dA[q, j] = <dU_q, X_j>
  if (this->bias_trains()) row_sums(dYt, d, ld, this->db_.data());
  this->finish_backward(dX);
}

template class CpuTinyLoraLinear<float>;
template class CpuTinyLoraLinear<double>;

}  // namespace relora
