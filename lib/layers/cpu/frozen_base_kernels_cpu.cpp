// A bf16 or fp16 base on the CPU: 16-bit storage, fp32 products. Each product widens a panel of
// W's rows into fp32 (exact) and runs Eigen's fp32 GEMM on it (CpuGemm, whose packing memory and
// panels are kept, so a steady step allocates nothing). Widening costs one pass over W per
// product, small beside the product's n d k multiply-adds; it runs on every thread.
#include <algorithm>
#include <cmath>

#include "cpu/cpu_gemm.hpp"
#include "cpu/cpu_parallel.hpp"
#include "cpu/cpu_row_passes.hpp"
#include "layers/cpu/grown_buffer.hpp"
#include "layers/frozen_base_kernels.hpp"

namespace relora {
namespace {

// Elements of W widened at once: 4 MiB of fp32, a panel that stays in the last-level cache.
constexpr Index kPanelElements = Index(1) << 20;

class CpuFrozenBaseKernels final : public FrozenBaseKernels {
 public:
  void round(const float* src, Index count, Index first_index, BasePrecision format, HalfRounding mode, RngKey key,
             std::uint16_t* dst) override {
    if (mode == HalfRounding::nearest) {
      if (format == BasePrecision::bf16) {
        for_each_element(count, [&](Index i) { dst[i] = half_bits::bf16_nearest(src[i]); });
      } else {
        for_each_element(count, [&](Index i) { dst[i] = half_bits::round_float(src[i], format, mode, 0.0f); });
      }
    } else {
      for_each_element(count, [&](Index i) {
        const float u = half_bits::rounding_uniform(key, std::uint64_t(first_index + i));
        dst[i] = half_bits::round_float(src[i], format, mode, u);
      });
    }
  }

  void widen(const std::uint16_t* src, Index count, BasePrecision format, float* dst) override {
    if (format == BasePrecision::bf16) {
      for_each_element(count, [&](Index i) { dst[i] = half_bits::bf16_to_float(src[i]); });
    } else {
      for_each_element(count, [&](Index i) { dst[i] = half_bits::fp16_to_float(src[i]); });
    }
  }

  double max_abs(const std::uint16_t* src, Index count, BasePrecision format) override {
    float largest = 0;
    for (Index i = 0; i < count; ++i) {
      const float a = std::fabs(half_bits::half_to_float(src[i], format));
      if (!(a <= largest)) largest = std::isnan(a) ? INFINITY : a;
    }
    return largest;
  }

  void forward_product(const Tensor<float>& X, const std::uint16_t* W, BasePrecision format, const float* bias,
                       float beta, bool relu, Tensor<float>& Y) override {
    const Index n = X.rows(), k = X.cols(), d = Y.cols();
    const Index panel_rows = std::max<Index>(1, std::min<Index>(d, kPanelElements / std::max<Index>(k, 1)));
    scale_in_place(beta, Y);
    for (Index first = 0; first < d; first += panel_rows) {
      const Index rows = std::min(panel_rows, d - first);
      Tensor<float> panel = panel_.view(rows, k);
      widen(W + first * k, rows * k, format, panel.data());
      if (rows == d) {
        gemm_.multiply_add(Trans::no, Trans::yes, 1.0f, X, panel, Y);  // the whole W in one panel
        continue;
      }
      Tensor<float> part = columns_.view(n, rows);  // Y[:, first:first + rows] += X panel^T
      std::fill_n(part.data(), part.size(), 0.0f);
      gemm_.multiply_add(Trans::no, Trans::yes, 1.0f, X, panel, part);
      for (Index i = 0; i < n; ++i) {
        float* row = Y.data() + i * d + first;
        const float* from = part.data() + i * rows;
        for (Index j = 0; j < rows; ++j) row[j] += from[j];
      }
    }
    finish_rows(bias, relu, Y);
  }

  void input_gradient_product(const Tensor<float>& dY, const std::uint16_t* W, BasePrecision format, float beta,
                              Tensor<float>& dX) override {
    const Index n = dY.rows(), d = dY.cols(), k = dX.cols();
    scale_in_place(beta, dX);
    const Index panel_rows = std::max<Index>(1, std::min<Index>(d, kPanelElements / std::max<Index>(k, 1)));
    for (Index first = 0; first < d; first += panel_rows) {
      const Index rows = std::min(panel_rows, d - first);
      Tensor<float> panel = panel_.view(rows, k);
      widen(W + first * k, rows * k, format, panel.data());
      if (rows == d) {
        gemm_.multiply_add(Trans::no, Trans::no, 1.0f, dY, panel, dX);
        continue;
      }
      Tensor<float> part = columns_.view(n, rows);  // dY[:, first:first + rows], packed
      for (Index i = 0; i < n; ++i) std::copy_n(dY.data() + i * d + first, rows, part.data() + i * rows);
      gemm_.multiply_add(Trans::no, Trans::no, 1.0f, part, panel, dX);
    }
  }

 private:
  CpuGemm<float> gemm_;
  GrownBuffer<float> panel_;    // W's rows, widened
  GrownBuffer<float> columns_;  // a block of Y's or dY's columns
};

}  // namespace

std::unique_ptr<FrozenBaseKernels> make_cpu_frozen_base_kernels() { return std::make_unique<CpuFrozenBaseKernels>(); }

}  // namespace relora
