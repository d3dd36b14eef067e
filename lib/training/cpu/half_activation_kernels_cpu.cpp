// The CPU's kernels of 16-bit activations: loops over half_precision.hpp's functions, threaded
// with OpenMP over large tensors. Each loop is compiled for one format (bf16's conversions are a
// shift and bf16_nearest, which equals round_float to nearest: test_bf16_base.cpp), so that it
// vectorises; the values are the same functions' as on CUDA.
#include <type_traits>

#include "cpu/cpu_parallel.hpp"
#include "cpu/cpu_squared_errors.hpp"
#include "relora/core/elementwise_math.hpp"
#include "training/half_activation_kernels.hpp"

namespace relora {
namespace {

template <BasePrecision F>
float widen_one(std::uint16_t h) {
  if constexpr (F == BasePrecision::bf16) {
    return half_bits::bf16_to_float(h);
  } else {
    return half_bits::fp16_to_float(h);
  }
}

template <BasePrecision F>
std::uint16_t round_one(float x) {
  if constexpr (F == BasePrecision::bf16) {
    return half_bits::bf16_nearest(x);
  } else {
    return half_bits::round_float(x, F, HalfRounding::nearest, 0.0f);
  }
}

// body(format) with format.value == `format`, a constant.
template <typename Body>
void with_format(BasePrecision format, Body&& body) {
  if (format == BasePrecision::bf16) {
    body(std::integral_constant<BasePrecision, BasePrecision::bf16>{});
  } else if (format == BasePrecision::fp16) {
    body(std::integral_constant<BasePrecision, BasePrecision::fp16>{});
  } else {
    throw ConfigError("16-bit activations: the format must be bf16 or fp16, not fp32");
  }
}

class CpuHalfActivationKernels final : public HalfActivationKernels {
 public:
  void round(const float* src, Index count, BasePrecision format, std::uint16_t* dst) override {
    with_format(format, [&](auto format_constant) {
      constexpr BasePrecision F = decltype(format_constant)::value;
      for_each_element(count, [&](Index i) { dst[i] = round_one<F>(src[i]); });
    });
  }

  void widen(const std::uint16_t* src, Index count, BasePrecision format, float* dst) override {
    with_format(format, [&](auto format_constant) {
      constexpr BasePrecision F = decltype(format_constant)::value;
      for_each_element(count, [&](Index i) { dst[i] = widen_one<F>(src[i]); });
    });
  }

  void relu(std::uint16_t* y, Index count, BasePrecision format) override {
    with_format(format, [&](auto format_constant) {
      constexpr BasePrecision F = decltype(format_constant)::value;
      for_each_element(count, [&](Index i) {
        y[i] = round_one<F>(activation_value(Activation::relu, widen_one<F>(y[i])));
      });
    });
  }

  void relu_backward(const std::uint16_t* y, const std::uint16_t* dz, Index count, BasePrecision format,
                     std::uint16_t* dy) override {
    with_format(format, [&](auto format_constant) {
      constexpr BasePrecision F = decltype(format_constant)::value;
      for_each_element(count, [&](Index i) {
        const float slope = activation_derivative(Activation::relu, widen_one<F>(y[i]));
        dy[i] = round_one<F>(widen_one<F>(dz[i]) * slope);
      });
    });
  }

  void mse(const std::uint16_t* y, const float* target, Index count, BasePrecision format, std::uint16_t* dy,
           float* loss) override {
    with_format(format, [&](auto format_constant) {
      constexpr BasePrecision F = decltype(format_constant)::value;
      *loss = mean_squared_error(
          count, [y](Index i) { return widen_one<F>(y[i]); }, target,
          [dy](Index i, float grad) { dy[i] = round_one<F>(grad); });
    });
  }
};

}  // namespace

std::unique_ptr<HalfActivationKernels> make_cpu_half_activation_kernels() {
  return std::make_unique<CpuHalfActivationKernels>();
}

}  // namespace relora
