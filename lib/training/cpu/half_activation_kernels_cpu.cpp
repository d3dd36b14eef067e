// The CPU's kernels of 16-bit activations: loops over half_precision.hpp's functions, threaded
// with OpenMP over large tensors.
#include "relora/core/elementwise_math.hpp"
#include "training/half_activation_kernels.hpp"

namespace relora {
namespace {

class CpuHalfActivationKernels final : public HalfActivationKernels {
 public:
  void round(const float* src, Index count, BasePrecision format, std::uint16_t* dst) override {
#pragma omp parallel for schedule(static) if (count > kParallelFrom)
    for (Index i = 0; i < count; ++i) dst[i] = half_bits::round_float(src[i], format, HalfRounding::nearest, 0.0f);
  }

  void widen(const std::uint16_t* src, Index count, BasePrecision format, float* dst) override {
#pragma omp parallel for schedule(static) if (count > kParallelFrom)
    for (Index i = 0; i < count; ++i) dst[i] = half_bits::half_to_float(src[i], format);
  }

  void relu(std::uint16_t* y, Index count, BasePrecision format) override {
#pragma omp parallel for schedule(static) if (count > kParallelFrom)
    for (Index i = 0; i < count; ++i) {
      const float v = half_bits::half_to_float(y[i], format);
      y[i] = half_bits::round_float(activation_value(Activation::relu, v), format, HalfRounding::nearest, 0.0f);
    }
  }

  void relu_backward(const std::uint16_t* y, const std::uint16_t* dz, Index count, BasePrecision format,
                     std::uint16_t* dy) override {
#pragma omp parallel for schedule(static) if (count > kParallelFrom)
    for (Index i = 0; i < count; ++i) {
      const float slope = activation_derivative(Activation::relu, half_bits::half_to_float(y[i], format));
      dy[i] = half_bits::round_float(half_bits::half_to_float(dz[i], format) * slope, format, HalfRounding::nearest,
                                     0.0f);
    }
  }

 private:
  static constexpr Index kParallelFrom = Index(1) << 15;
};

}  // namespace

std::unique_ptr<HalfActivationKernels> make_cpu_half_activation_kernels() {
  return std::make_unique<CpuHalfActivationKernels>();
}

}  // namespace relora
