// Adam's CPU kernels: the update as one loop per slot (vectorised, on every thread for large
// slots) and pruning of the moments by a partial sort. This file is compiled with
// -ffp-contract=off so that the loop rounds as the CUDA kernels do (adam_rule.hpp).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "cpu/cpu_parallel.hpp"
#include "cpu/eigen_maps.hpp"
#include "optimizers/adam_kernels.hpp"
#include "optimizers/adam_rule.hpp"
#include "relora/core/errors.hpp"

namespace relora {
namespace {

template <typename T>
class CpuAdamKernels final : public AdamKernels<T> {
 public:
  explicit CpuAdamKernels(std::vector<AdamSlot<T>> slots) : slots_(std::move(slots)) {}

  void update(const AdamHyper& hyper) override {
    // Refuse the whole step before touching anything if one gradient is not finite.
    for (const AdamSlot<T>& slot : slots_) {
      if (!ConstArrayMap<T>(slot.grad, slot.size).isFinite().all()) {
        throw NonFiniteError(std::string("adam step refused: gradient of '") + slot.name +
                             "' holds NaN or Inf; no parameter was updated");
      }
    }
    // The slots mostly share one step count: the bias corrections are computed once per count
    // (they are most of Adam's time on a tiny model).
    double t_corrected = -1, c1 = 0, c2 = 0;
    for (const AdamSlot<T>& slot : slots_) {
      const double t = double(*slot.step) + 1;
      if (t != t_corrected) {
        c1 = adam_rule::bias_correction(hyper.beta1, t);
        c2 = adam_rule::bias_correction(hyper.beta2, t);
        t_corrected = t;
      }
      const double lr = slot.lr * hyper.lr_factor;
      T* p = slot.param;
      const T* g = slot.grad;
      T* m = slot.m;
      T* v = slot.v;
      for_each_element(slot.size,
                       [&](Index i) { adam_element(p[i], g[i], m[i], v[i], lr, slot.weight_decay, hyper, c1, c2); });
      *slot.step = T(t);
    }
  }

  void prune(PruneMode mode, double fraction, RngKey key, Tensor<T>& m, Tensor<T>& v) override {
    const Index count = static_cast<Index>(std::llround(fraction * double(m.size())));
    if (count == 0) return;
    const T* data = m.data();
    order_.resize(static_cast<std::size_t>(m.size()));
    std::iota(order_.begin(), order_.end(), Index(0));
    if (mode == PruneMode::magnitude) {
      // Ties broken by index so that the CPU and CUDA kernels zero the same entries.
      std::nth_element(order_.begin(), order_.begin() + (count - 1), order_.end(), [&](Index a, Index b) {
        const T ma = std::abs(data[a]), mb = std::abs(data[b]);
        return ma < mb || (ma == mb && a < b);
      });
    } else {
      std::nth_element(order_.begin(), order_.begin() + (count - 1), order_.end(), [&](Index a, Index b) {
        const std::uint64_t ra = random_bits(key, std::uint64_t(a)), rb = random_bits(key, std::uint64_t(b));
        return ra < rb || (ra == rb && a < b);
      });
    }
    for (Index i = 0; i < count; ++i) {
      m.data()[order_[std::size_t(i)]] = T(0);
      v.data()[order_[std::size_t(i)]] = T(0);
    }
  }

 private:
  std::vector<AdamSlot<T>> slots_;
  std::vector<Index> order_;  // pruning's index order, kept so that restarts reuse it
};

}  // namespace

template <typename T>
std::unique_ptr<AdamKernels<T>> make_cpu_adam_kernels(std::vector<AdamSlot<T>> slots) {
  return std::make_unique<CpuAdamKernels<T>>(std::move(slots));
}

template std::unique_ptr<AdamKernels<float>> make_cpu_adam_kernels(std::vector<AdamSlot<float>>);
template std::unique_ptr<AdamKernels<double>> make_cpu_adam_kernels(std::vector<AdamSlot<double>>);

}  // namespace relora
