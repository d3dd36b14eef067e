// A tiny LoRA layer's forward (with the MSE after it, where it is a model's last) and backward in one pass each, on the CPU.
//
// Why: the seed demo's layer (n = 200, k = 10, d = 5, r = 4) costs about 1 us per product through
// Eigen's GEMM for a few thousand multiply-adds, six products a step: row-major, the product's
// long side (n) lands on the micro-kernel's short side and most SIMD lanes compute padding, and
// every call packs its operands again. Here the batch is computed feature-major: each group of
// kLanes rows is transposed into one SIMD register per feature (every lane a real row of the
// batch), the layer's products run as multiply-adds across those lanes with the small matrices'
// entries broadcast, and the results are transposed back. No allocation, no threads.
//
// Where the time goes (seed_demo's whole training step on the 2-core AMD development machine: 2.8
// us at best, 25K instructions): the combine kernels about 28%, the transposes of U, Y, dY and dU
// back to rows 23%, the reductions for dA, dB and db 15%, the memcmp of the kept panels 6%, then
// Adam. So each tensor is transposed at most once per step, and the batch and the target not at
// all once they are kept:
// - the forward keeps its feature-major X and U in the backend (FusedLoraScratch), and the
//   backward that follows it on the same X and U reads those instead of transposing them again.
//   Sound because X and U are unchanged in between: LoraLinear requires X to be, U is its own,
//   and every operation of this backend that writes a tensor drops the copies of what it
//   overwrites (CpuBackend::wrote). A caller that writes X through its raw host pointer between a
//   forward and its backward breaks LoraLinear's contract on every backend;
// - X's panel and the target's are kept from one step to the next while the tensors hold the
//   values they were made from (compared with a copy of their rows): full-batch training passes
//   the same batch every step, and a batch rewritten in place, through the backend or not, is
//   transposed again;
// - with the MSE fused into the last layer's forward, dY and dU = s dY B are computed there while
//   the strip is in L1, and its backward reads their panels.
//
// Beyond the limits below the separate products are faster (Eigen's blocked kernels and its
// threads) and the backend answers "not fused".
#include <algorithm>

#include "cpu/cpu_backend.hpp"
#include "cpu/cpu_panels.hpp"
#include "layers/fused_lora_checks.hpp"

namespace relora {
namespace {

using namespace cpu_panels;

constexpr Index kMaxWidth = 16;  // k and d
constexpr Index kMaxRank = 8;    // beyond it the reductions for dA and dB outweigh what fusing saves
// Rows per strip: each pass runs over a strip of rows before the next, so that a large batch is
// computed while its rows are in L1 (the seed demo's 200 rows are one strip).
constexpr Index kStrip = 256;
static_assert(kStrip % kLanes<float> == 0 && kStrip % kLanes<double> == 0, "a strip holds whole registers");
// Multiply-adds per step (forward and backward together) up to which the fused pass is used:
// beyond it Eigen's kernels, and its threads, catch up (relora_bench --custom, PERFORMANCE.md).
constexpr double kMaxWork = double(1 << 20);

// A layer's shape and its operands, as both passes read them.
template <typename T>
struct LayerView {
  Index n, k, d, r;  // rows, in, out, rank
  const T* X;
  const T* W;
  const T* A;
  const T* B;
};

template <typename T>
LayerView<T> view_of(const LoraLayerTensors<T>& layer) {
  return {layer.X->rows(), layer.X->cols(), layer.W->rows(), layer.A->rows(),
          layer.X->data(), layer.W->data(),  layer.A->data(), layer.B->data()};
}

template <typename T>
bool small_enough(const LayerView<T>& s) {
  if (s.k > kMaxWidth || s.d > kMaxWidth || s.r > kMaxRank) return false;
  const double work = double(s.n) * double(2 * s.k * s.r + 2 * s.k * s.d + 3 * s.d * s.r);
  return work <= kMaxWork;
}

// Strip by strip: X into its panel (unless `X_loaded`), U = X A^T, Y = X W^T + b + s U B^T, and
// where `mse` is given dY and dU from Y while the strip is in L1. The panels of X and U (and of the
// target, dY and dU) cover the whole batch, for the backward and the next step to read.
template <typename T>
void forward_strips(FusedLoraScratch<T>& scratch, const LayerView<T>& v, bool X_loaded, const T* b, T s, T* U, T* Y,
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
      if (!mse->target_loaded) load_rows(mse->target->data() + first * d, d, rows, tt, ld);
      mse->squared_errors += squared_errors_in_lanes(Yt, kStrip, tt, ld, dyt, ld, d, rows, mse->grad_scale);
      combine(v.B, Index(1), r, r, d, s, dyt, ld, dut, ld, lanes);  // dU = s dY B: coef(q, o) = B[o, q]
      store_rows(dyt, ld, d, rows, mse->dY + first * d);
      store_rows(dut, ld, r, rows, mse->dU + first * r);
    }
  }
}

}  // namespace

template <typename T>
void CpuBackend<T>::fused_forward_pass(const LoraLayerTensors<T>& layer, Tensor<T>& U, Tensor<T>& Y,
                                       FusedMseOutputs<T>* mse) {
  const LayerView<T> v = view_of(layer);
  fused_.forget_outputs();  // until the panels hold this forward's U (and dY, dU)
  const bool X_loaded = fused_.X.holds(*layer.X);
  if (mse) mse->target_loaded = fused_.target.holds(*mse->target);
  forward_strips<T>(fused_, v, X_loaded, layer.b ? layer.b->data() : nullptr, layer.scale, U.data(), Y.data(), mse);
  wrote(U);
  wrote(Y);
  if (!X_loaded) fused_.X.keep(*layer.X);
  fused_.U = {U.data(), v.n, v.r};
}

template <typename T>
bool CpuBackend<T>::fused_lora_forward(const LoraLayerTensors<T>& layer, Tensor<T>& U, Tensor<T>& Y) {
  if (!fused_small_layers_) return false;
  check_fused_forward(layer, U, Y);
  if (!small_enough(view_of(layer))) return false;
  fused_forward_pass(layer, U, Y, nullptr);
  return true;
}

template <typename T>
bool CpuBackend<T>::fused_lora_forward_mse(const LoraLayerTensors<T>& layer, const Tensor<T>& target, Tensor<T>& U,
                                           Tensor<T>& Y, Tensor<T>& dY, Tensor<T>& loss, Tensor<T>& dU) {
  if (!fused_small_layers_) return false;
  check_fused_forward_mse(layer, target, U, Y, dY, loss, dU);
  if (!small_enough(view_of(layer))) return false;
  const Index size = Y.size();
  FusedMseOutputs<T> mse{&target, false, T(2) / T(size), dY.data(), dU.data()};  // CpuBackend::mse's scale
  fused_forward_pass(layer, U, Y, &mse);
  loss.data()[0] = T(mse.squared_errors / double(size));  // and its mean
  for (const Tensor<T>* out : {&dY, &loss, &dU}) wrote(*out);
  if (!mse.target_loaded) fused_.target.keep(target);
  fused_.dY = {dY.data(), Y.rows(), Y.cols()};
  fused_.dU = {dU.data(), U.rows(), U.cols()};
  return true;
}

template <typename T>
bool CpuBackend<T>::fused_lora_backward(const LoraLayerTensors<T>& layer, const Tensor<T>& U, const Tensor<T>& dY,
                                        const LoraLayerGradients<T>& grads) {
  if (!fused_small_layers_) return false;
  check_fused_backward(layer, U, dY, grads);
  const LayerView<T> v = view_of(layer);
  if (!small_enough(v)) return false;
  const Index n = v.n, k = v.k, d = v.d, r = v.r, ld = panel_stride<T>(n);
  const T s = layer.scale;

  // X and U feature-major: the forward's copies when this backward follows it (see the top).
  T* Xt = panel(fused_.X.panel, k, ld);
  T* Ut = panel(fused_.Ut, r, ld);
  if (!fused_.X.source.is(*layer.X)) {
    load_rows(v.X, k, n, Xt, ld);
    fused_.X.keep(*layer.X);
  }
  if (!fused_.U.is(U)) {
    load_rows(U.data(), r, n, Ut, ld);
    fused_.U = {U.data(), n, r};
  }
  // dY and dU = s dY B feature-major: the fused MSE's, when it computed them for this dY.
  const bool from_mse = grads.dU_ready && fused_.dY.is(dY) && fused_.dU.is(*grads.dU);
  fused_.dY = fused_.dU = {};  // the panels are this backward's from here on

  T* dYt = panel(fused_.dYt, d, ld);
  T* dUt = panel(fused_.dUt, r, ld);
  T* dXt = grads.dX ? panel(fused_.strip, k, kStrip) : nullptr;
  if (!from_mse || dXt) {
    for (Index first = 0; first < n; first += kStrip) {
      const Index rows = std::min(kStrip, n - first), lanes = panel_stride<T>(rows);
      T* dyt = dYt + first;
      T* dut = dUt + first;
      if (!from_mse) {
        load_rows(dY.data() + first * d, d, rows, dyt, ld);
        combine(v.B, Index(1), r, r, d, s, dyt, ld, dut, ld, lanes);  // dU = s dY B: coef(q, o) = B[o, q]
        store_rows(dut, ld, r, rows, grads.dU->data() + first * r);
      }
      if (dXt) {
        combine(v.W, Index(1), k, k, d, T(1), dyt, ld, dXt, kStrip, lanes);                               // dX = dY W
        combine(v.A, Index(1), k, k, r, T(1), dut, ld, dXt, kStrip, lanes, nullptr, /*accumulate=*/true);  // += dU A
        store_rows(dXt, kStrip, k, rows, grads.dX->data() + first * k);
      }
    }
  }
  dot_all(Ut, r, dYt, d, ld, s, grads.dB->data(), Index(1), r);     // dB[o, q] = s <dY_o, U_q>
  dot_all(dUt, r, Xt, k, ld, T(1), grads.dA->data(), k, Index(1));  // dA[q, j] = <dU_q, X_j>
  if (grads.db) row_sums(dYt, d, ld, grads.db->data());

  for (Tensor<T>* out : {grads.dU, grads.dA, grads.dB, grads.db, grads.dX}) {
    if (out) wrote(*out);
  }
  return true;
}

#define RELORA_INSTANTIATE_FUSED(T)                                                                             \
  template bool CpuBackend<T>::fused_lora_forward(const LoraLayerTensors<T>&, Tensor<T>&, Tensor<T>&);         \
  template bool CpuBackend<T>::fused_lora_forward_mse(const LoraLayerTensors<T>&, const Tensor<T>&, Tensor<T>&, \
                                                      Tensor<T>&, Tensor<T>&, Tensor<T>&, Tensor<T>&);         \
  template bool CpuBackend<T>::fused_lora_backward(const LoraLayerTensors<T>&, const Tensor<T>&, const Tensor<T>&, \
                                                   const LoraLayerGradients<T>&);
RELORA_INSTANTIATE_FUSED(float)
RELORA_INSTANTIATE_FUSED(double)
#undef RELORA_INSTANTIATE_FUSED

}  // namespace relora
